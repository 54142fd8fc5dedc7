//! Conformance: the built binary driven the way runtimes drive it (env + stdin), through every
//! verb and error path. Needs root; each test has its own namespaces (prefix `slc-`).

mod common;

use common::*;
use serde_json::{Value, json};

const SUBNET: &str = "10.250.1.0/24";

#[test]
fn version_answers_in_callers_version() {
    for v in ["0.4.0", "1.0.0", "1.1.0"] {
        let c = exec_plugin(
            BIN,
            None,
            &[("CNI_COMMAND", "VERSION")],
            json!({ "cniVersion": v }).to_string().as_bytes(),
        );
        let out = c.ok();
        assert_eq!(out["cniVersion"], v);
        assert_eq!(out["supportedVersions"], json!(["0.4.0", "1.0.0", "1.1.0"]));
    }
    // No stdin at all (older runtimes): still an answer.
    let c = exec_plugin(BIN, None, &[("CNI_COMMAND", "VERSION")], b"");
    assert_eq!(c.ok()["cniVersion"], "1.1.0");
}

#[test]
fn decode_version_and_env_errors() {
    let env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "x"),
        ("CNI_NETNS", "/nonexistent"),
        ("CNI_IFNAME", "eth0"),
    ];
    // Malformed JSON: 6.
    let c = exec_plugin(BIN, None, &env, b"{\"cniVersion\": \"1.0.0\",");
    assert_eq!(c.code(), 6);
    assert!(c.json["msg"].as_str().unwrap().contains("not valid JSON"));
    // Unsupported version: 1, and the message names the supported ones.
    let c = exec_plugin(
        BIN,
        None,
        &env,
        br#"{"cniVersion":"0.3.1","name":"n","type":"sluice-cni"}"#,
    );
    assert_eq!(c.code(), 1);
    assert!(c.json["msg"].as_str().unwrap().contains("1.1.0"));
    // Invalid config: 7.
    let c = exec_plugin(
        BIN,
        None,
        &env,
        br#"{"cniVersion":"1.0.0","name":"n","type":"sluice-cni","agent":false}"#,
    );
    assert_eq!(c.code(), 7);
    assert!(c.json["msg"].as_str().unwrap().contains("subnet"));
    // Missing CNI_COMMAND, unknown CNI_COMMAND, missing CNI_CONTAINERID: 4.
    let conf = br#"{"cniVersion":"1.0.0","name":"n","type":"sluice-cni","agent":false,"ipam":{"subnet":"10.250.0.0/24"}}"#;
    assert_eq!(exec_plugin(BIN, None, &[], conf).code(), 4);
    assert_eq!(
        exec_plugin(BIN, None, &[("CNI_COMMAND", "FROB")], conf).code(),
        4
    );
    let c = exec_plugin(
        BIN,
        None,
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_NETNS", "/x"),
            ("CNI_IFNAME", "eth0"),
        ],
        conf,
    );
    assert_eq!(c.code(), 4);
    assert!(c.json["msg"].as_str().unwrap().contains("CNI_CONTAINERID"));
    let c = exec_plugin(
        BIN,
        None,
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "x"),
            ("CNI_IFNAME", "eth0"),
        ],
        conf,
    );
    assert_eq!(c.code(), 4);
    // Errors answer in the caller's version.
    assert_eq!(c.json["cniVersion"], "1.0.0");
    // GC and STATUS need 1.1.0.
    assert_eq!(
        exec_plugin(BIN, None, &[("CNI_COMMAND", "STATUS")], conf).code(),
        1
    );
    // A field understood but not supported: 2, naming key and value.
    let v6 = br#"{"cniVersion":"1.0.0","name":"n","type":"sluice-cni","agent":false,"ipam":{"subnet":"fd00::/64"}}"#;
    let c = exec_plugin(BIN, None, &env, v6);
    assert_eq!(c.code(), 2);
    assert!(c.json["msg"].as_str().unwrap().contains("fd00::/64"));
}

#[test]
fn add_check_del_lifecycle_all_versions() {
    if !require_root("add_check_del_lifecycle_all_versions") {
        return;
    }
    for version in ["0.4.0", "1.0.0", "1.1.0"] {
        let node = Node::standalone("life", version, SUBNET);
        let pod = Netns::new("life-p");
        // Unknown fields are ignored.
        let conf = with(
            &node.conf,
            json!({ "someRuntimeKey": { "x": [1, 2] }, "capabilities": { "portMappings": true } }),
        );
        let add = node.call("ADD", &conf, "ctr-life", &pod.path(), "eth0");
        let r = add.ok().clone();
        assert_eq!(r["cniVersion"], version);
        let ip = result_ip(&r);
        assert!(ip.starts_with("10.250.1."), "{r}");
        assert_eq!(r["interfaces"][1]["name"], "eth0");
        assert_eq!(r["interfaces"][1]["sandbox"], pod.path());
        assert_eq!(r["ips"][0]["interface"], 1);
        assert_eq!(r["ips"][0].get("version").is_some(), version == "0.4.0");
        assert_eq!(r["routes"][0].get("mtu").is_some(), version == "1.1.0");
        assert!(pod.ipv4_addrs().contains(&format!("{ip}/32")));
        let routes = pod.run(&["ip", "route"]);
        assert!(
            routes.contains("default via 169.254.1.1 dev eth0"),
            "{routes}"
        );
        assert!(routes.contains("onlink mtu 1450"), "{routes}");
        assert!(
            pod.run(&["ip", "neigh"])
                .contains("169.254.1.1 dev eth0 lladdr")
        );
        assert!(
            pod.run(&["ethtool", "-k", "eth0"])
                .contains("tx-checksumming: on")
        );
        assert_eq!(pod.run(&["cat", "/sys/class/net/eth0/mtu"]).trim(), "65535");
        let host_routes = node.host.run(&["ip", "route"]);
        assert!(
            host_routes.contains(&format!("{ip} dev sl")),
            "{host_routes}"
        );
        // ADD again: the same result.
        let again = node.call("ADD", &conf, "ctr-life", &pod.path(), "eth0");
        assert_eq!(again.ok(), &r);
        assert_eq!(node.allocations().len(), 1);
        // CHECK with prevResult: fine.
        let conf_check = with(&conf, json!({ "prevResult": r }));
        node.call("CHECK", &conf_check, "ctr-life", &pod.path(), "eth0")
            .ok();
        // Drift: delete a route in the pod, CHECK reports it.
        pod.run(&["ip", "route", "del", "default"]);
        let c = node.call("CHECK", &conf_check, "ctr-life", &pod.path(), "eth0");
        assert_eq!(c.code(), 100);
        assert!(
            c.json["msg"].as_str().unwrap().contains("route 0.0.0.0/0"),
            "{}",
            c.stdout
        );
        // DEL twice: both succeed, everything is gone.
        node.call("DEL", &conf, "ctr-life", &pod.path(), "eth0")
            .ok();
        node.call("DEL", &conf, "ctr-life", &pod.path(), "eth0")
            .ok();
        assert!(node.allocations().is_empty());
        assert!(node.host_veths().is_empty());
        assert!(!pod.links().contains(&"eth0".to_string()));
        // CHECK after DEL: container unknown.
        assert_eq!(
            node.call("CHECK", &conf_check, "ctr-life", &pod.path(), "eth0")
                .code(),
            3
        );
    }
}

#[test]
fn missing_netns_and_taken_ifname() {
    if !require_root("missing_netns_and_taken_ifname") {
        return;
    }
    let node = Node::standalone("errs", "1.0.0", SUBNET);
    let c = node.call(
        "ADD",
        &node.conf,
        "ctr-gone",
        "/var/run/netns/slc-does-not-exist",
        "eth0",
    );
    assert_eq!(c.code(), 3);
    assert!(c.json["msg"].as_str().unwrap().contains("does not exist"));
    // DEL with a netns that is gone succeeds.
    node.call(
        "DEL",
        &node.conf,
        "ctr-gone",
        "/var/run/netns/slc-does-not-exist",
        "eth0",
    )
    .ok();
    node.call("DEL", &node.conf, "ctr-gone", "", "eth0").ok();
    // A path that is not a network namespace.
    let c = node.call("ADD", &node.conf, "ctr-file", "/etc/hostname", "eth0");
    assert_eq!(c.code(), 4);
    // Interface name already taken in the pod.
    let pod = Netns::new("errs-p");
    pod.run(&[
        "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "other0",
    ]);
    let c = node.call("ADD", &node.conf, "ctr-taken", &pod.path(), "eth0");
    assert_eq!(c.code(), 4);
    assert!(
        c.json["msg"].as_str().unwrap().contains("already exists"),
        "{}",
        c.stdout
    );
    assert!(node.allocations().is_empty(), "{:?}", node.allocations());
    assert!(node.host_veths().is_empty());
    // An invalid interface name.
    assert_eq!(
        node.call(
            "ADD",
            &node.conf,
            "ctr-x",
            &pod.path(),
            "this-name-is-way-too-long"
        )
        .code(),
        4
    );
}

#[test]
fn exhaustion_names_the_range() {
    if !require_root("exhaustion_names_the_range") {
        return;
    }
    let node = Node::standalone("full", "1.0.0", "10.250.9.0/30");
    let (p1, p2) = (Netns::new("full-a"), Netns::new("full-b"));
    assert_eq!(result_ip(node.add("ctr-a", &p1).ok()), "10.250.9.2");
    let c = node.add("ctr-b", &p2);
    assert_eq!(c.code(), 11);
    let msg = c.json["msg"].as_str().unwrap();
    assert!(
        msg.contains("10.250.9.0/30") && msg.contains("10.250.9.2"),
        "{msg}"
    );
    assert!(!p2.links().contains(&"eth0".to_string()));
    node.del("ctr-a", &p1).ok();
    assert_eq!(result_ip(node.add("ctr-b", &p2).ok()), "10.250.9.2");
    node.del("ctr-b", &p2).ok();
}

#[test]
fn gc_releases_what_is_not_valid() {
    if !require_root("gc_releases_what_is_not_valid") {
        return;
    }
    let node = Node::standalone("gc", "1.1.0", SUBNET);
    let pods: Vec<Netns> = (0..3).map(|i| Netns::new(&format!("gc-{i}"))).collect();
    for (i, p) in pods.iter().enumerate() {
        node.add(&format!("ctr-gc-{i}"), p).ok();
    }
    assert_eq!(node.allocations().len(), 3);
    let conf = with(
        &node.conf,
        json!({ "cni.dev/valid-attachments": [ { "containerID": "ctr-gc-1", "ifname": "eth0" } ] }),
    );
    let env = [("CNI_COMMAND", "GC"), ("CNI_PATH", UPSTREAM)];
    exec_plugin(BIN, Some(&node.host), &env, conf.to_string().as_bytes()).ok();
    assert_eq!(node.allocations().len(), 1);
    assert_eq!(node.host_veths().len(), 1);
    assert!(pods[1].links().contains(&"eth0".to_string()));
    assert!(!pods[0].links().contains(&"eth0".to_string()));
    // GC without the list is an invalid configuration.
    assert_eq!(
        exec_plugin(
            BIN,
            Some(&node.host),
            &env,
            node.conf.to_string().as_bytes()
        )
        .code(),
        7
    );
    // An empty list releases everything.
    let conf = with(&node.conf, json!({ "cni.dev/valid-attachments": [] }));
    exec_plugin(BIN, Some(&node.host), &env, conf.to_string().as_bytes()).ok();
    assert!(node.allocations().is_empty());
    assert!(node.host_veths().is_empty());
}

fn agent_conf(node: &Node, socket: &std::path::Path) -> Value {
    let mut conf = node.conf.clone();
    conf["agent"] = json!(true);
    conf["agentSocket"] = json!(socket);
    conf["agentTimeoutMs"] = json!(2000);
    conf["ipam"] = json!({ "dataDir": node.dir.path() });
    conf["runtimeConfig"] = json!({ "portMappings": [ { "hostPort": 8080, "containerPort": 80, "protocol": "tcp" } ], "labels": { "app": "web" } });
    conf
}

#[test]
fn status_with_and_without_agent() {
    if !require_root("status_with_and_without_agent") {
        return;
    }
    let node = Node::standalone("status", "1.1.0", SUBNET);
    let env = [("CNI_COMMAND", "STATUS")];
    // Standalone: ready.
    exec_plugin(
        BIN,
        Some(&node.host),
        &env,
        node.conf.to_string().as_bytes(),
    )
    .ok();
    // Agent configured but absent: 50.
    let gone = node.dir.path().join("no-agent.sock");
    let c = exec_plugin(
        BIN,
        Some(&node.host),
        &env,
        agent_conf(&node, &gone).to_string().as_bytes(),
    );
    assert_eq!(c.code(), 50);
    assert!(
        c.json["msg"].as_str().unwrap().contains("no-agent.sock"),
        "{}",
        c.stdout
    );
    // Agent present and ready: success; present but not ready: 50 with its message.
    let agent = TestAgentServer::start("10.250.5.0/24", false, true);
    exec_plugin(
        BIN,
        Some(&node.host),
        &env,
        agent_conf(&node, &agent.socket).to_string().as_bytes(),
    )
    .ok();
    let busy = TestAgentServer::start("10.250.5.0/24", false, false);
    let c = exec_plugin(
        BIN,
        Some(&node.host),
        &env,
        agent_conf(&node, &busy.socket).to_string().as_bytes(),
    );
    assert_eq!(c.code(), 50);
    assert!(c.json["msg"].as_str().unwrap().contains("not ready"));
}

#[test]
fn agent_registration_and_deregistration() {
    if !require_root("agent_registration_and_deregistration") {
        return;
    }
    let node = Node::standalone("agent", "1.0.0", SUBNET);
    let agent = TestAgentServer::start("10.250.6.0/24", false, true);
    let conf = agent_conf(&node, &agent.socket);
    let pod = Netns::new("agent-p");
    let args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0";
    let r = node.call_env(
        "ADD",
        &conf,
        "ctr-agent",
        &pod.path(),
        "eth0",
        &[("CNI_ARGS", args)],
    );
    let r = r.ok().clone();
    let ip = result_ip(&r);
    assert!(
        ip.starts_with("10.250.6."),
        "the agent's pod CIDR is used: {ip}"
    );
    let rec = agent.recorded();
    let Some(Recorded::Add(a)) = rec.first() else {
        panic!("no AddPod: {rec:?}")
    };
    assert_eq!(a.container_id, "ctr-agent");
    assert_eq!(a.ip, ip);
    assert_eq!(a.ifname, "eth0");
    assert_eq!(a.netns, pod.path());
    assert_eq!((a.namespace.as_str(), a.name.as_str()), ("shop", "web-0"));
    assert_eq!(a.labels.get("app").map(String::as_str), Some("web"));
    assert_eq!(a.ports[0].port, 80);
    assert_eq!(a.ports[0].protocol, "TCP");
    assert_eq!(a.pod_mac.len(), 6);
    assert_eq!(a.host_ifname, r["interfaces"][0]["name"].as_str().unwrap());
    let idx: u32 = node
        .host
        .run(&["cat", &format!("/sys/class/net/{}/ifindex", a.host_ifname)])
        .trim()
        .parse()
        .unwrap();
    assert_eq!(a.host_ifindex, idx);
    node.call("DEL", &conf, "ctr-agent", &pod.path(), "eth0")
        .ok();
    assert!(
        matches!(agent.recorded().last(), Some(Recorded::Del(d)) if d.container_id == "ctr-agent" && d.ifname == "eth0")
    );
    assert!(node.allocations().is_empty());
}

#[test]
fn agent_unreachable_or_failing_rolls_back() {
    if !require_root("agent_unreachable_or_failing_rolls_back") {
        return;
    }
    let node = Node::standalone("noagent", "1.0.0", SUBNET);
    let pod = Netns::new("noagent-p");
    // Unreachable: 11, nothing created.
    let mut conf = agent_conf(&node, &node.dir.path().join("absent.sock"));
    conf["ipam"]["subnet"] = json!(SUBNET);
    let c = node.call("ADD", &conf, "ctr-na", &pod.path(), "eth0");
    assert_eq!(c.code(), 11);
    assert!(
        c.json["msg"].as_str().unwrap().contains("absent.sock"),
        "{}",
        c.stdout
    );
    assert!(node.host_veths().is_empty());
    assert!(!pod.links().contains(&"eth0".to_string()));
    assert!(node.allocations().is_empty());
    // Reachable but AddPod fails after the wiring: 11 and everything rolled back.
    let agent = TestAgentServer::start("10.250.7.0/24", true, true);
    let conf = agent_conf(&node, &agent.socket);
    let c = node.call("ADD", &conf, "ctr-na", &pod.path(), "eth0");
    assert_eq!(c.code(), 11);
    assert!(
        c.json["msg"].as_str().unwrap().contains("AddPod"),
        "{}",
        c.stdout
    );
    assert!(node.host_veths().is_empty(), "{:?}", node.host_veths());
    assert!(!pod.links().contains(&"eth0".to_string()));
    assert!(
        pod.ipv4_addrs().trim().lines().all(|l| l.contains(" lo ")),
        "{}",
        pod.ipv4_addrs()
    );
    assert!(node.allocations().is_empty(), "{:?}", node.allocations());
    assert!(!node.host.run(&["ip", "route"]).contains("10.250.7."));
}

#[test]
fn plain_mtu_mode() {
    if !require_root("plain_mtu_mode") {
        return;
    }
    let node = Node::standalone("plain", "1.1.0", SUBNET);
    let conf = with(&node.conf, json!({ "sluiceMtu": { "mode": "plain" } }));
    let pod = Netns::new("plain-p");
    let r = node
        .call("ADD", &conf, "ctr-plain", &pod.path(), "eth0")
        .ok()
        .clone();
    assert_eq!(pod.run(&["cat", "/sys/class/net/eth0/mtu"]).trim(), "1450");
    assert_eq!(r["routes"].as_array().unwrap().len(), 1);
    assert!(!pod.run(&["ip", "route"]).contains("mtu"));
    node.call(
        "CHECK",
        &with(&conf, json!({ "prevResult": r })),
        "ctr-plain",
        &pod.path(),
        "eth0",
    )
    .ok();
    node.call("DEL", &conf, "ctr-plain", &pod.path(), "eth0")
        .ok();
}

#[test]
fn integer_mtu_as_reference_plugins_spell_it() {
    if !require_root("integer_mtu_as_reference_plugins_spell_it") {
        return;
    }
    let node = Node::standalone("imtu", "1.1.0", SUBNET);
    let pod = Netns::new("imtu-p");
    // `"mtu": 1450` is the interface MTU (both veth ends); no route carries a larger one.
    let conf = with(&node.conf, json!({ "mtu": 1450 }));
    let r = node
        .call("ADD", &conf, "ctr-imtu", &pod.path(), "eth0")
        .ok()
        .clone();
    assert_eq!(pod.run(&["cat", "/sys/class/net/eth0/mtu"]).trim(), "1450");
    let host_if = r["interfaces"][0]["name"].as_str().unwrap().to_owned();
    assert_eq!(
        node.host
            .run(&["cat", &format!("/sys/class/net/{host_if}/mtu")])
            .trim(),
        "1450"
    );
    assert_eq!(r["interfaces"][1]["mtu"], 1450);
    for route in r["routes"].as_array().unwrap() {
        assert_eq!(route["mtu"], 1450, "{r}");
    }
    node.call(
        "CHECK",
        &with(&conf, json!({ "prevResult": r })),
        "ctr-imtu",
        &pod.path(),
        "eth0",
    )
    .ok();
    node.call("DEL", &conf, "ctr-imtu", &pod.path(), "eth0")
        .ok();
    // With the plain mode of Sluice's own key: one default route, no route MTUs.
    let conf = with(
        &node.conf,
        json!({ "mtu": 9000, "sluiceMtu": { "mode": "plain" } }),
    );
    node.call("ADD", &conf, "ctr-imtu", &pod.path(), "eth0")
        .ok();
    assert_eq!(pod.run(&["cat", "/sys/class/net/eth0/mtu"]).trim(), "9000");
    assert!(!pod.run(&["ip", "route"]).contains("mtu"));
    node.call("DEL", &conf, "ctr-imtu", &pod.path(), "eth0")
        .ok();
    // What is not an interface MTU: 7, naming the key, nothing wired.
    for bad in [
        json!({ "mtu": "1450" }),
        json!({ "mtu": 70000 }),
        json!({ "mtu": 1450, "sluiceMtu": { "podMtu": 9000 } }),
    ] {
        let c = node.call(
            "ADD",
            &with(&node.conf, bad.clone()),
            "ctr-imtu",
            &pod.path(),
            "eth0",
        );
        assert_eq!(c.code(), 7, "{bad}: {}", c.stdout);
        assert!(
            c.json["msg"].as_str().unwrap().contains("mtu"),
            "{}",
            c.stdout
        );
    }
    assert!(node.host_veths().is_empty());
    assert!(node.allocations().is_empty());
}

#[test]
fn delegated_ipam_host_local() {
    if !require_root("delegated_ipam_host_local") {
        return;
    }
    let node = Node::standalone("deleg", "1.0.0", SUBNET);
    let store = node.dir.path().join("host-local");
    let conf = with(
        &node.conf,
        json!({ "dataDir": node.dir.path(), "ipam": { "type": "host-local", "subnet": "10.250.44.0/24", "dataDir": store, "rangeStart": "10.250.44.20" } }),
    );
    let pod = Netns::new("deleg-p");
    let r = node
        .call("ADD", &conf, "ctr-deleg", &pod.path(), "eth0")
        .ok()
        .clone();
    assert_eq!(result_ip(&r), "10.250.44.20");
    assert!(pod.ipv4_addrs().contains("10.250.44.20/32"));
    assert!(
        std::fs::read_dir(store.join("slc-net"))
            .unwrap()
            .any(|e| e.unwrap().file_name() == "10.250.44.20")
    );
    let checked = with(&conf, json!({ "prevResult": r }));
    node.call("CHECK", &checked, "ctr-deleg", &pod.path(), "eth0")
        .ok();
    node.call("DEL", &conf, "ctr-deleg", &pod.path(), "eth0")
        .ok();
    assert!(
        !std::fs::read_dir(store.join("slc-net"))
            .unwrap()
            .any(|e| e.unwrap().file_name() == "10.250.44.20")
    );
    assert!(node.host_veths().is_empty());
}
