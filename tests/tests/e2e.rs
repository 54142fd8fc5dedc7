//! End-to-end tests on a netns cluster (run as root). Each builds its own cluster; the harness
//! removes it on every path. In order of value: cross-node traffic first.

use std::net::Ipv4Addr;

use nix::sys::signal::Signal;
use sluice_e2e::manifests::{WEB_NODE_PORT, WEB_SERVICE, WEB_VIP, web_endpoints};
use sluice_e2e::{AgentOptions, Cluster, NodeKind, Result, TcpSession, require_root};

fn sluice_cluster(nodes: usize) -> Result<Cluster> {
    let mut c = Cluster::new(&vec![NodeKind::Sluice; nodes], AgentOptions::default())?;
    c.start_agents(|_, _| {})?;
    Ok(c)
}

fn check(r: Result<()>) {
    if let Err(e) = r {
        panic!("{e}");
    }
}

#[test]
fn cross_node_ping_and_tcp() {
    if !require_root() {
        return;
    }
    check((|| {
        let mut c = sluice_cluster(2)?;
        let a = c.add_pod(0, &[])?;
        let b = c.add_pod(1, &[])?;
        let out = c.ping(a, c.pods[b].ip, 5)?;
        println!("{out}");
        let (bytes, gbps) = c.iperf3(a, b, 3)?;
        println!("cross-node iperf3: {bytes} bytes, {gbps:.2} Gbit/s");
        assert!(bytes > 0);
        // It went through the workers of both nodes (no kernel route joins the pod CIDRs).
        for n in 0..2 {
            let f = c.wait_counters(n, |f| f.workers.iter().map(|w| w.tx).sum::<u64>() > 1000)?;
            println!("node {n} counters: {:?}", f.workers);
        }
        Ok(())
    })());
}

/// Cross-node TCP over a jumbo underlay (MTU 9000): the pods send 64 KiB frames, the sending
/// worker cuts them into VXLAN frames of up to 9000 bytes that span several UMEM chunks, and the
/// receiving node takes every one (the outer lengths once counted only a segment's first chunk,
/// and the receiver dropped every data segment as `bad_ip_length`).
#[test]
fn cross_node_tcp_over_a_jumbo_underlay() {
    if !require_root() {
        return;
    }
    check((|| {
        let options = AgentOptions {
            underlay_mtu: Some(9000),
            ..AgentOptions::default()
        };
        let mut c = Cluster::new(&[NodeKind::Sluice; 2], options)?;
        c.start_agents(|_, _| {})?;
        let a = c.add_pod(0, &[])?;
        let b = c.add_pod(1, &[])?;
        let (bytes, gbps) = c.iperf3(a, b, 2)?;
        println!("cross-node iperf3 at underlay MTU 9000: {bytes} bytes, {gbps:.2} Gbit/s");
        assert!(bytes > 10_000_000, "{bytes} bytes");
        for n in 0..2 {
            let f = c.nodes[n].counters()?;
            println!("node {n} counters: {:?}", f.workers);
            for w in &f.workers {
                assert!(
                    w.drops.get("bad_ip_length").is_none_or(|d| *d == 0),
                    "node {n}: {:?}",
                    w.drops
                );
            }
        }
        Ok(())
    })());
}

#[test]
fn same_node_ping_and_tcp() {
    if !require_root() {
        return;
    }
    check((|| {
        let mut c = sluice_cluster(1)?;
        let a = c.add_pod(0, &[])?;
        let b = c.add_pod(0, &[])?;
        println!("{}", c.ping(a, c.pods[b].ip, 5)?);
        let (bytes, gbps) = c.iperf3(a, b, 3)?;
        println!("same-node iperf3: {bytes} bytes, {gbps:.2} Gbit/s");
        assert!(bytes > 0);
        c.wait_counters(0, |f| f.workers.iter().map(|w| w.tx).sum::<u64>() > 1000)?;
        Ok(())
    })());
}

#[test]
fn kernel_flannel_node_interop() {
    if !require_root() {
        return;
    }
    check((|| {
        let mut c = Cluster::new(
            &[NodeKind::Sluice, NodeKind::Flannel],
            AgentOptions::default(),
        )?;
        c.start_agents(|_, _| {})?;
        let s = c.add_pod(0, &[])?;
        let f = c.add_pod(1, &[])?;
        println!("{}", c.ping(s, c.pods[f].ip, 3)?);
        println!("{}", c.ping(f, c.pods[s].ip, 3)?);
        let (bytes, _) = c.iperf3(f, s, 2)?;
        assert!(bytes > 0);
        Ok(())
    })());
}

#[test]
fn pod_to_node_and_outside_pass_through_kernel() {
    if !require_root() {
        return;
    }
    check((|| {
        let mut c = sluice_cluster(2)?;
        let a = c.add_pod(0, &[])?;
        // The own node's underlay address: host-bound, the XDP program passes it to the kernel.
        println!("{}", c.ping(a, c.nodes[0].underlay_ip, 3)?);
        // The classifier passed them to the kernel (host-bound), the workers never saw them.
        c.wait_counters(0, |f| f.xdp.get("pass_other").is_some_and(|n| *n >= 3))?;
        // A non-cluster address: node 0's kernel routes it onto the underlay, where node 1's
        // underlay address stands for the outside world (it has no route to the pod's address).
        // The agent masquerades it with no rule of the admin's: the outside sees node 0's address.
        let outside = c.nodes[1].underlay_ip;
        c.tcp_peer_server(&c.nodes[1].ns.clone(), 7070)?;
        let seen = Cluster::tcp_lines(&c.pods[a].ns, outside, 7070, &["who"])?;
        assert_eq!(
            seen,
            vec![c.nodes[0].underlay_ip.to_string()],
            "the outside saw the pod's traffic from this source"
        );
        println!("{}", c.ping(a, outside, 3)?);
        let table = sluice_e2e::sh(&c.nodes[0].ns, "nft list table ip sluice")?;
        let table = String::from_utf8_lossy(&table.stdout).into_owned();
        println!("{table}");
        assert!(table.contains("masquerade"), "{table}");
        // Traffic inside the cluster keeps the pod's address (a pod on node 1 sees it).
        let b = c.add_pod(1, &[])?;
        c.tcp_peer_server(&c.pods[b].ns.clone(), 7072)?;
        let seen = Cluster::tcp_lines(&c.pods[a].ns, c.pods[b].ip, 7072, &["who"])?;
        assert_eq!(seen, vec![c.pods[a].ip.to_string()]);

        // A clean stop removes the table.
        c.stop_agent(0, Signal::SIGTERM)?;
        let after = sluice_e2e::sh(&c.nodes[0].ns, "nft list tables")?;
        let after = String::from_utf8_lossy(&after.stdout).into_owned();
        assert!(
            !after.contains("sluice"),
            "masquerade table left behind: {after}"
        );
        Ok(())
    })());
}

/// `masquerade.enabled: false` leaves the kernel's NAT alone and removes a table a killed agent
/// left behind.
#[test]
fn masquerade_can_be_turned_off() {
    if !require_root() {
        return;
    }
    check((|| {
        let mut c = Cluster::new(&[NodeKind::Sluice], AgentOptions::default())?;
        c.start_agents(|_, _| {})?;
        let tables = |c: &Cluster| -> Result<String> {
            let out = sluice_e2e::sh(&c.nodes[0].ns, "nft list tables")?;
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        assert!(tables(&c)?.contains("table ip sluice"));
        c.stop_agent(0, Signal::SIGKILL)?;
        assert!(
            tables(&c)?.contains("table ip sluice"),
            "kept while the agent is down"
        );
        let mut config = c.node_config(0);
        config.masquerade.enabled = false;
        c.write_config(0, &config)?;
        c.start_agent(0)?;
        let now = tables(&c)?;
        assert!(!now.contains("sluice"), "masquerade off, yet: {now}");
        Ok(())
    })());
}

/// SIGKILL leaves the pinned links in place (fail-open); the restarted agent finds them, replaces
/// the program in them, re-registers its pods from the registry and traffic resumes without the
/// pods being recreated. The replaced program is gone (no leak), and a clean SIGTERM removes every
/// link, pin and the socket.
#[test]
fn agent_sigkill_restart_resumes_traffic() {
    if !require_root() {
        return;
    }
    check((|| {
        let mut c = sluice_cluster(2)?;
        let a = c.add_pod(0, &[])?;
        let b = c.add_pod(1, &[])?;
        c.ping(a, c.pods[b].ip, 2)?;
        let pins = c.nodes[0].link_pins();
        assert_eq!(pins.len(), 2, "uplink and pod veth links pinned: {pins:?}");
        let old_prog = c.nodes[0].xdp_prog_id("eth0")?.expect("XDP on the uplink");

        c.stop_agent(0, Signal::SIGKILL)?;
        assert_eq!(c.nodes[0].link_pins(), pins, "pins survive SIGKILL");
        c.start_agent(0)?;
        let (ready, why) = c.agent_status(0)?;
        assert!(ready, "agent not ready after restart: {why}");
        println!("{}", c.ping(a, c.pods[b].ip, 3)?);
        assert_eq!(c.nodes[0].link_pins(), pins, "the same links are reused");
        let new_prog = c.nodes[0].xdp_prog_id("eth0")?.expect("XDP on the uplink");
        assert_eq!(
            c.nodes[0].xdp_prog_id(&c.pods[a].host_ifname)?,
            Some(new_prog)
        );
        assert!(
            !sluice_e2e::bpf_prog_exists(old_prog),
            "the program of the killed agent ({old_prog}) leaked"
        );
        c.wait_counters(0, |f| f.pods == 1)?;

        c.stop_agent(0, Signal::SIGTERM)?;
        assert!(!c.nodes[0].socket().exists(), "socket removed on SIGTERM");
        assert!(!c.nodes[0].pin_dir_exists(), "pins removed on SIGTERM");
        assert_eq!(c.nodes[0].xdp_prog_id("eth0")?, None);
        assert_eq!(c.nodes[0].xdp_prog_id(&c.pods[a].host_ifname)?, None);
        assert!(
            !sluice_e2e::bpf_prog_exists(new_prog),
            "program {new_prog} leaked"
        );
        Ok(())
    })());
}

/// The control path works without a datapath: API answers, the registry persists across SIGKILL,
/// DelPod is idempotent, SIGTERM removes the socket.
#[test]
fn agent_control_path_survives_sigkill() {
    if !require_root() {
        return;
    }
    check((|| {
        let mut c = Cluster::new(
            &[NodeKind::Sluice],
            AgentOptions {
                no_datapath: true,
                ..Default::default()
            },
        )?;
        c.start_agents(|_, _| {})?;
        let (ready, why) = c.agent_status(0)?;
        assert!(!ready);
        assert!(why.contains("without a datapath"), "{why}");
        let p = c.add_pod(0, &[("app", "web")])?;
        // Bad requests are refused with InvalidArgument and a reason, and change nothing.
        let good = sluice_control::agent_api::AddPodRequest {
            container_id: "bad".into(),
            host_ifname: c.pods[p].host_ifname.clone(),
            host_ifindex: 1,
            ip: "10.244.9.9".into(),
            pod_mac: vec![2, 0, 0, 0, 0, 1],
            host_mac: vec![2, 0, 0, 0, 0, 2],
            ..Default::default()
        };
        let (code, why) = c
            .add_pod_raw(0, good.clone())?
            .expect_err("foreign pod CIDR");
        assert_eq!(code, "InvalidArgument");
        assert!(why.contains("10.244.1.0/24"), "{why}");
        let (code, _) = c
            .add_pod_raw(
                0,
                sluice_control::agent_api::AddPodRequest {
                    pod_mac: vec![1, 2, 3],
                    ..good.clone()
                },
            )?
            .expect_err("short MAC");
        assert_eq!(code, "InvalidArgument");
        let (code, why) = c
            .add_pod_raw(
                0,
                sluice_control::agent_api::AddPodRequest {
                    ip: c.pods[p].ip.to_string(),
                    ..good
                },
            )?
            .expect_err("address in use");
        assert_eq!(code, "InvalidArgument");
        assert!(why.contains("already belongs"), "{why}");
        let registry = std::fs::read_to_string(c.nodes[0].state_dir().join("pods.json"))
            .map_err(|e| sluice_e2e::HarnessError::Setup(e.to_string()))?;
        assert!(registry.contains(&c.pods[p].container_id));
        c.stop_agent(0, Signal::SIGKILL)?;
        c.start_agent(0)?;
        c.wait_counters(0, |f| f.pods == 1)?;
        assert!(c.del_pod(p)?);
        assert!(!c.del_pod(p)?);
        c.stop_agent(0, Signal::SIGTERM)?;
        assert!(!c.nodes[0].socket().exists(), "socket removed on SIGTERM");
        Ok(())
    })());
}

#[test]
fn harness_leaves_no_namespace_behind() {
    if !require_root() {
        return;
    }
    let prefix;
    {
        let c = Cluster::new(
            &[NodeKind::Sluice, NodeKind::Sluice],
            AgentOptions::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        prefix = c.prefix.clone();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        assert!(mounts.contains(&prefix), "per-node bpffs mounted");
        let list = std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&list.stdout).contains(&prefix));
    }
    let list = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(
        !text.lines().any(|l| l.starts_with(&format!("{prefix}-"))),
        "left behind: {text}"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    assert!(!mounts.contains(&prefix), "bpffs mounts left behind");
}

/// Backends 10.244.1.3 (node 0), 10.244.2.2 and 10.244.2.3 (node 1).
const WEB_BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 244, 1, 3),
    Ipv4Addr::new(10, 244, 2, 2),
    Ipv4Addr::new(10, 244, 2, 3),
];

/// Two nodes with the `web` service; pods: client 10.244.1.2 and backend 10.244.1.3 on node 0,
/// backends 10.244.2.2 and 10.244.2.3 on node 1, each running the echo server on 8080.
fn web_cluster() -> Result<(Cluster, usize)> {
    web_cluster_with(AgentOptions::default())
}

/// [`web_cluster`] with these agent options.
fn web_cluster_with(options: AgentOptions) -> Result<(Cluster, usize)> {
    let mut c = Cluster::new(&[NodeKind::Sluice; 2], options)?;
    let svc = c.write_manifest("services.yaml", WEB_SERVICE)?;
    let eps = c.write_manifest("endpointslices.yaml", &web_endpoints(&WEB_BACKENDS))?;
    c.start_agents(|_, cfg| {
        cfg.manifests.services.push(svc.clone());
        cfg.manifests.endpoint_slices.push(eps.clone());
    })?;
    let client = c.add_pod(0, &[])?;
    for (node, _) in [(0, 3), (1, 2), (1, 3)] {
        let p = c.add_pod(node, &[("app", "web")])?;
        c.tcp_echo_server(p, 8080)?;
    }
    Ok((c, client))
}

const VIP: Ipv4Addr = WEB_VIP;

#[test]
fn clusterip_service_spreads_and_sticks() {
    if !require_root() {
        return;
    }
    check((|| {
        let (c, client) = web_cluster()?;
        let ns = c.pods[client].ns.clone();
        let mut served = std::collections::BTreeMap::<String, usize>::new();
        for i in 0..24 {
            let l1 = format!("c{i}a");
            let l2 = format!("c{i}b");
            let l3 = format!("c{i}c");
            let reply = Cluster::tcp_lines(&ns, VIP, 80, &[&l1, &l2, &l3])?;
            assert_eq!(reply.len(), 3, "connection {i}: {reply:?}");
            let backend = reply[0].split(' ').next().unwrap_or_default().to_owned();
            for (line, sent) in reply.iter().zip([&l1, &l2, &l3]) {
                // Every line of one connection comes from the same backend.
                assert_eq!(line, &format!("{backend} {sent}"), "connection {i} moved");
            }
            *served.entry(backend).or_default() += 1;
        }
        println!("connections per backend: {served:?}");
        let expected: Vec<&str> = vec!["10.244.1.3", "10.244.2.2", "10.244.2.3"];
        assert_eq!(
            served.keys().map(String::as_str).collect::<Vec<_>>(),
            expected
        );
        Ok(())
    })());
}

/// Removing a backend (EndpointSlice change, SIGHUP) keeps established connections to the other
/// backends on theirs, and new connections avoid the removed one.
#[test]
fn clusterip_backend_removal_keeps_established_connections() {
    if !require_root() {
        return;
    }
    check(backend_removal_keeps_established(AgentOptions::default()));
}

/// The same with two workers per node (two-queue uplink, single-queue pod veths): a connection's
/// frames are steered by its client endpoint, not by Maglev's current choice, so established
/// connections keep their worker (and its conntrack entry) when the backend set changes.
#[test]
fn clusterip_backend_removal_keeps_established_connections_over_two_workers() {
    if !require_root() {
        return;
    }
    check(backend_removal_keeps_established(AgentOptions {
        uplink_queues: 2,
        pod_queues: 1,
        ..Default::default()
    }));
}

fn backend_removal_keeps_established(options: AgentOptions) -> Result<()> {
    {
        let (c, client) = web_cluster_with(options)?;
        let ns = c.pods[client].ns.clone();
        let mut sessions = Vec::new();
        for i in 0..12 {
            let mut s = TcpSession::open(&ns, VIP, 80)?;
            let reply = s.exchange(&format!("s{i}"))?;
            let backend = reply.split(' ').next().unwrap_or_default().to_owned();
            sessions.push((s, backend));
        }
        let removed = "10.244.2.3";
        let endpoints =
            c.write_manifest("endpointslices.yaml", &web_endpoints(&WEB_BACKENDS[..2]))?;
        assert!(
            !std::fs::read_to_string(&endpoints)
                .map_err(|e| sluice_e2e::HarnessError::Setup(e.to_string()))?
                .contains(removed)
        );
        c.reload(0)?;
        let mut kept = 0;
        for (i, (s, backend)) in sessions.iter_mut().enumerate() {
            if backend == removed {
                continue;
            }
            let reply = s.exchange(&format!("again{i}"))?;
            assert_eq!(reply, format!("{backend} again{i}"), "session {i} moved");
            kept += 1;
        }
        assert!(kept > 0, "no session on a remaining backend");
        for i in 0..12 {
            let reply = Cluster::tcp_lines(&ns, VIP, 80, &[&format!("n{i}")])?;
            assert_eq!(reply.len(), 1);
            assert!(
                !reply[0].starts_with(removed),
                "new connection to the removed backend"
            );
        }
        let f = c.nodes[0].counters()?;
        assert_eq!(f.drops("conntrack_invalid"), 0, "{:?}", f.workers);
        Ok(())
    }
}

#[test]
fn nodeport_from_the_underlay() {
    if !require_root() {
        return;
    }
    check((|| {
        let (c, _) = web_cluster()?;
        // A client on the underlay: an address on the switch's bridge.
        sluice_e2e::ip(Some(&c.switch), "addr add 192.168.77.100/24 dev br0")?;
        let mut served = std::collections::BTreeSet::new();
        for node in 0..2 {
            for i in 0..8 {
                let line = format!("n{node}c{i}");
                let reply = Cluster::tcp_lines(
                    &c.switch,
                    c.nodes[node].underlay_ip,
                    WEB_NODE_PORT,
                    &[&line],
                )?;
                assert_eq!(reply.len(), 1, "NodePort on node {node}: {reply:?}");
                let (backend, echoed) = reply[0].split_once(' ').unwrap_or_default();
                assert_eq!(echoed, line);
                served.insert(backend.to_owned());
            }
        }
        println!("NodePort served by {served:?}");
        assert!(served.len() >= 2, "NodePort reached only {served:?}");
        Ok(())
    })());
}

#[test]
fn network_policy_default_deny_then_allow() {
    if !require_root() {
        return;
    }
    const ALLOW: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-db, namespace: default}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-clients, namespace: default}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress]
  ingress:
    - from: [{podSelector: {matchLabels: {role: client}}}]
      ports: [{port: 8080, protocol: TCP}]
"#;
    check((|| {
        let mut c = Cluster::new(&[NodeKind::Sluice], AgentOptions::default())?;
        let policies = c.write_manifest("policies.yaml", sluice_e2e::DENY_DB_INGRESS)?;
        let p = policies.clone();
        c.start_agents(move |_, cfg| cfg.manifests.network_policies.push(p.clone()))?;
        let db = c.add_pod(0, &[("app", "db")])?;
        let client = c.add_pod(0, &[("role", "client")])?;
        let other = c.add_pod(0, &[("role", "other")])?;
        c.tcp_echo_server(db, 8080)?;
        let db_ip = c.pods[db].ip;

        // Default deny: nothing reaches the db pod, and the drops are counted by reason.
        assert!(
            c.ping(client, db_ip, 2).is_err(),
            "ping passed a default deny"
        );
        assert!(Cluster::tcp_lines(&c.pods[client].ns, db_ip, 8080, &["x"]).is_err_or_empty());
        let f = c.wait_counters(0, |f| f.drops("policy_denied_ingress") > 0)?;
        println!("drops after deny: {:?}", f.workers[0].drops);

        // Allow role=client on TCP 8080: the client gets through, others still do not.
        std::fs::write(&policies, ALLOW)
            .map_err(|e| sluice_e2e::HarnessError::Setup(e.to_string()))?;
        c.reload(0)?;
        let reply = Cluster::tcp_lines(&c.pods[client].ns, db_ip, 8080, &["hello"])?;
        assert_eq!(reply, vec![format!("{db_ip} hello")]);
        let denied_before = c.nodes[0].counters()?.drops("policy_denied_ingress");
        assert!(Cluster::tcp_lines(&c.pods[other].ns, db_ip, 8080, &["x"]).is_err_or_empty());
        assert!(
            c.ping(client, db_ip, 1).is_err(),
            "ICMP is not in the allowed ports"
        );
        c.wait_counters(0, |f| f.drops("policy_denied_ingress") > denied_before)?;
        Ok(())
    })());
}

trait ErrOrEmpty {
    fn is_err_or_empty(&self) -> bool;
}

impl ErrOrEmpty for Result<Vec<String>> {
    fn is_err_or_empty(&self) -> bool {
        self.as_ref().map_or(true, |v| v.is_empty())
    }
}

/// Throughput figures (printed, not asserted beyond bytes moved): iperf3 TCP and 64-byte UDP
/// between pods same-node and cross-node through Sluice, and cross-node between two kernel
/// Flannel nodes on the same underlay. Set SLUICE_AGENT_BIN to a release build for real figures.
#[test]
fn throughput_report() {
    if !require_root() {
        return;
    }
    check((|| {
        let mut s = sluice_cluster(2)?;
        let a = s.add_pod(0, &[])?;
        let b = s.add_pod(0, &[])?;
        let r = s.add_pod(1, &[])?;
        let (_, same) = s.iperf3(a, b, 3)?;
        // SLUICE_E2E_PERF=<file>: profile node 0's agent during the cross-node transfer.
        let perf = std::env::var("SLUICE_E2E_PERF").ok().and_then(|out| {
            let pid = s.nodes[0].agent.as_ref()?.id().to_string();
            std::process::Command::new("perf")
                .args(["record", "-g", "-o", &out, "-p", &pid, "--", "sleep", "2"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .ok()
        });
        let (_, cross) = s.iperf3(a, r, 3)?;
        if let Some(mut p) = perf {
            let _ = p.wait();
        }
        let (_, cross_udp) = s.iperf3_udp64(a, r, 3)?;
        // Pods offload their checksums: on the same node they arrive partial (the kernel
        // completes them from AF_XDP TX metadata), from another node the segmenter computed
        // them; either way no receiver saw a bad one.
        for (p, way) in [(b, "same node"), (r, "across nodes")] {
            let out = sluice_e2e::sh(&s.pods[p].ns, "nstat -az TcpInCsumErrors UdpInCsumErrors")?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let bad: u64 = text
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
            assert_eq!(bad, 0, "checksum errors in the pod reached {way}: {text}");
        }
        drop(s);
        let mut k = Cluster::new(&[NodeKind::Flannel; 2], AgentOptions::default())?;
        k.start_agents(|_, _| {})?;
        let ka = k.add_pod(0, &[])?;
        let kr = k.add_pod(1, &[])?;
        let (_, kernel) = k.iperf3(ka, kr, 3)?;
        let (_, kernel_udp) = k.iperf3_udp64(ka, kr, 3)?;
        println!(
            "THROUGHPUT sluice same-node TCP {same:.2} Gbit/s; cross-node TCP {cross:.2} Gbit/s, \
             UDP 64 B {:.0} kpps received; kernel Flannel cross-node TCP {kernel:.2} Gbit/s, \
             UDP 64 B {:.0} kpps received; TCP ratio {:.2}",
            cross_udp / 1e3,
            kernel_udp / 1e3,
            cross / kernel
        );
        assert!(same > 0.0 && cross > 0.0 && kernel > 0.0);
        Ok(())
    })());
}

const IPERF_SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: iperf, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.20
  ports:
    - {name: iperf, port: 5201, targetPort: 5201, protocol: TCP, nodePort: 30201}
"#;

/// The single backend 10.244.2.2 (the first pod of node 1).
const IPERF_ENDPOINTS: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: iperf-1
  namespace: default
  labels: {kubernetes.io/service-name: iperf}
addressType: IPv4
ports: [{name: iperf, port: 5201, protocol: TCP}]
endpoints:
  - addresses: [10.244.2.2]
"#;

/// A two-queue uplink, one worker per queue, and single-queue pod veths (each pod's socket
/// belongs to one worker). Flows arrive on either uplink queue (the switch hashes the outer
/// headers), and a pod's frames at its socket's worker; conntrack is per worker, so each frame is
/// steered to its connection's owner (`steer::owner`) and frames for a port another worker holds
/// are handed to it. Real TCP (iperf3 `-P 4`, so flows land on both queues): pod to pod across
/// nodes, through a ClusterIP to a backend on the other node, and between two pods of one node
/// whose sockets belong to different workers, and from the underlay to a NodePort whose backend
/// is on the other node; bytes arrive, handoffs happen, and no frame meets a worker without its
/// connection (`conntrack_invalid`) or is dropped by policy.
#[test]
fn multi_queue_uplink_spreads_over_workers() {
    if !require_root() {
        return;
    }
    check((|| {
        let mut c = Cluster::new(
            &[NodeKind::Sluice; 2],
            AgentOptions {
                uplink_queues: 2,
                pod_queues: 1,
                ..Default::default()
            },
        )?;
        let svc = c.write_manifest("services.yaml", IPERF_SERVICE)?;
        let eps = c.write_manifest("endpointslices.yaml", IPERF_ENDPOINTS)?;
        c.start_agents(|_, cfg| {
            cfg.manifests.services.push(svc.clone());
            cfg.manifests.endpoint_slices.push(eps.clone());
        })?;
        let r = c.add_pod(1, &[])?;
        assert_eq!(c.pods[r].ip, Ipv4Addr::new(10, 244, 2, 2));
        // Two pods of node 0 whose host veths' sockets belong to different workers (ifindex
        // parity, as the agent assigns single-queue ports).
        let a = c.add_pod(0, &[])?;
        let mut b = c.add_pod(0, &[])?;
        for _ in 0..4 {
            if c.host_ifindex(b)? % 2 != c.host_ifindex(a)? % 2 {
                break;
            }
            b = c.add_pod(0, &[])?;
        }
        assert_ne!(c.host_ifindex(b)? % 2, c.host_ifindex(a)? % 2);
        // Each ping process uses its own ICMP id, hence its own flow.
        for _ in 0..8 {
            c.ping(a, c.pods[r].ip, 1)?;
            c.ping(b, c.pods[a].ip, 1)?;
        }
        let p4 = ["-P", "4"];
        let (cross, cross_gbps) = c.iperf3_with(a, r, 2, &p4)?;
        println!("cross-node TCP -P 4: {cross} bytes, {cross_gbps:.2} Gbit/s");
        let vip = Ipv4Addr::new(10, 96, 0, 20);
        let (via_vip, vip_gbps) = c.iperf3_to(a, r, vip, 2, &p4)?;
        println!("ClusterIP TCP -P 4: {via_vip} bytes, {vip_gbps:.2} Gbit/s");
        let (same, same_gbps) = c.iperf3_with(b, a, 2, &p4)?;
        println!("same-node TCP -P 4 across workers: {same} bytes, {same_gbps:.2} Gbit/s");
        // A client on the underlay to node 0's NodePort: SNATed there to a port of the owning
        // worker's share, so the backend's replies come back to that worker.
        sluice_e2e::ip(Some(&c.switch), "addr add 192.168.77.100/24 dev br0")?;
        let node0 = c.nodes[0].underlay_ip;
        let (np, np_gbps) = c.iperf3_from(&c.switch, r, node0, 2, &["-p", "30201", "-P", "4"])?;
        println!("NodePort TCP -P 4 from the underlay: {np} bytes, {np_gbps:.2} Gbit/s");
        assert!(cross > 0 && via_vip > 0 && same > 0 && np > 0);
        let mut handoffs = 0;
        for n in 0..2 {
            let f = c.wait_counters(n, |f| {
                f.workers.len() == 2 && f.workers.iter().all(|w| w.rx > 0)
            })?;
            println!("node {n}: {:?}", f.workers);
            for reason in [
                "conntrack_invalid",
                "policy_denied_egress",
                "policy_denied_ingress",
                "handoff_unsupported",
                "no_socket",
            ] {
                assert_eq!(
                    f.drops(reason),
                    0,
                    "node {n} drops {reason}: {:?}",
                    f.workers
                );
            }
            handoffs += f.workers.iter().map(|w| w.handoffs).sum::<u64>();
        }
        assert!(handoffs > 0, "no frame was handed to another worker");
        Ok(())
    })());
}

/// Pods wired by the real CNI plugin (`sluice-cni ADD`, which calls the agent's NodeInfo and
/// AddPod) talk across nodes; `DEL` withdraws the pod from its agent.
#[test]
fn cni_plugin_wires_pods_across_nodes() {
    if !require_root() {
        return;
    }
    check((|| {
        let mut c = sluice_cluster(2)?;
        let a = c.add_pod_cni(0, &[("app", "a")])?;
        let b = c.add_pod_cni(1, &[("app", "b")])?;
        assert_eq!(
            c.pods[a].ip,
            Ipv4Addr::new(10, 244, 1, 2),
            "first address of node 0"
        );
        println!("{}", c.ping(a, c.pods[b].ip, 3)?);
        println!("{}", c.ping(b, c.pods[a].ip, 3)?);
        let (bytes, gbps) = c.iperf3(a, b, 2)?;
        println!("CNI pods cross-node: {bytes} bytes, {gbps:.2} Gbit/s");
        c.wait_counters(0, |f| f.pods == 1)?;
        c.del_pod_cni(a)?;
        c.wait_counters(0, |f| f.pods == 0)?;
        assert!(
            c.ping(b, c.pods[a].ip, 1).is_err(),
            "a deleted pod still answers"
        );
        Ok(())
    })());
}
