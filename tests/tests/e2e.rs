//! End-to-end tests on a netns cluster (run as root). Each builds its own cluster; the harness
//! removes it on every path. In order of value: cross-node traffic first.

use std::net::Ipv4Addr;

use nix::sys::signal::Signal;
use sluice_e2e::{AgentOptions, Cluster, NodeKind, Result, require_root};

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
        // A non-cluster address: routed by node 0's kernel onto the underlay (the other node's
        // underlay address stands for "outside"; node 1 routes back to 10.244.1.0/24 through its
        // own Sluice datapath only for pods, so give it a kernel route to node 0 for the reply).
        sluice_e2e::ip(
            Some(&c.nodes[1].ns),
            &format!("route add 10.244.1.0/24 via {}", c.nodes[0].underlay_ip),
        )?;
        println!("{}", c.ping(a, c.nodes[1].underlay_ip, 3)?);
        Ok(())
    })());
}

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
        c.stop_agent(0, Signal::SIGKILL)?;
        c.start_agent(0)?;
        let (ready, why) = c.agent_status(0)?;
        assert!(ready, "agent not ready after restart: {why}");
        println!("{}", c.ping(a, c.pods[b].ip, 3)?);
        let counters = c.nodes[0].counters()?;
        assert_eq!(
            counters.pods, 1,
            "the restarted agent re-registered its pod"
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
        let registry = std::fs::read_to_string(c.nodes[0].state_dir().join("pods.json"))
            .map_err(|e| sluice_e2e::HarnessError::Setup(e.to_string()))?;
        assert!(registry.contains(&c.pods[p].container_id));
        c.stop_agent(0, Signal::SIGKILL)?;
        c.start_agent(0)?;
        // Wait for the first counters export of the new agent.
        std::thread::sleep(std::time::Duration::from_millis(1500));
        assert_eq!(c.nodes[0].counters()?.pods, 1);
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
    let _ = Ipv4Addr::LOCALHOST;
}
