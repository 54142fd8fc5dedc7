//! While the agent is gone (SIGKILL), frames its sockets would have taken fall back to the kernel
//! (fail-open), except where NetworkPolicy isolates a pod: those are dropped by the XDP program,
//! so a dead agent never turns into an open door.

use nix::sys::signal::Signal;
use sluice_e2e::{AgentOptions, Cluster, HarnessError, NodeKind, Result, require_root};

fn check(r: Result<()>) {
    if let Err(e) = r {
        panic!("{e}");
    }
}

/// `bpftool -j map dump pinned <path>`, parsed.
fn dump_map(path: &std::path::Path) -> Result<serde_json::Value> {
    let out = sluice_e2e::run(
        std::process::Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(path),
    )?;
    serde_json::from_slice(&out.stdout).map_err(|e| HarnessError::Setup(format!("bpftool: {e}")))
}

/// The classifier's `drop_no_socket` counter, summed over CPUs, read from the pinned map (the
/// agent that would report it is dead).
fn drop_no_socket(c: &Cluster) -> Result<u64> {
    let v = dump_map(&c.nodes[0].bpffs().join("sluice/n0/maps/sluice_counters"))?;
    let values = v[0]["formatted"]["values"]
        .as_array()
        .ok_or_else(|| HarnessError::Setup(format!("unexpected counters dump: {v}")))?;
    Ok(values
        .iter()
        .filter_map(|cpu| cpu["value"]["drop_no_socket"].as_u64())
        .sum())
}

#[test]
fn isolated_pod_fails_closed_while_the_agent_is_dead() {
    if !require_root() {
        return;
    }
    check((|| {
        let mut c = Cluster::new(&[NodeKind::Sluice], AgentOptions::default())?;
        let policies = c.write_manifest("policies.yaml", sluice_e2e::DENY_DB_INGRESS)?;
        c.start_agents(move |_, cfg| cfg.manifests.network_policies.push(policies.clone()))?;
        let db = c.add_pod(0, &[("app", "db")])?;
        let web = c.add_pod(0, &[("app", "web")])?;
        let client = c.add_pod(0, &[("role", "client")])?;
        let (db_ip, web_ip) = (c.pods[db].ip, c.pods[web].ip);

        // Agent alive: the workers enforce the policy.
        c.ping(client, web_ip, 1)?;
        assert!(c.ping(client, db_ip, 1).is_err(), "policy not enforced");

        // The isolation is mirrored into the pinned map: only db, ingress (flag 1).
        let isolated = dump_map(&c.nodes[0].bpffs().join("sluice/n0/maps/sluice_isolated"))?;
        let entries = isolated.as_array().map(Vec::len).unwrap_or(0);
        assert_eq!(entries, 1, "isolated map: {isolated}");
        assert_eq!(
            isolated[0]["formatted"]["key"].as_u64(),
            Some(u64::from(u32::from_ne_bytes(db_ip.octets()))),
            "{isolated}"
        );
        println!("isolated map: {isolated}");

        c.stop_agent(0, Signal::SIGKILL)?;
        // Fail-open for the pod no policy selects: the kernel forwards it (this is what makes the
        // next assertion meaningful: the kernel path does deliver).
        println!("{}", c.ping(client, web_ip, 2)?);
        let before = drop_no_socket(&c)?;
        assert!(
            c.ping(client, db_ip, 2).is_err(),
            "the isolated pod was reachable while the agent was dead"
        );
        let after = drop_no_socket(&c)?;
        println!("drop_no_socket: {before} -> {after}");
        assert!(
            after >= before + 2,
            "drops not counted: {before} -> {after}"
        );

        // Back: the restarted agent re-registers its sockets and enforces again.
        c.start_agent(0)?;
        c.ping(client, web_ip, 1)?;
        assert!(
            c.ping(client, db_ip, 1).is_err(),
            "policy not enforced after restart"
        );
        // The restarted agent replaced the punt link of the killed one; SIGTERM removes it.
        let links = |c: &Cluster| -> Result<String> {
            let o = sluice_e2e::ip(Some(&c.nodes[0].ns), "-br link")?;
            Ok(String::from_utf8_lossy(&o.stdout).into_owned())
        };
        let now = links(&c)?;
        assert_eq!(
            now.lines()
                .filter(|l| l.starts_with("sluice-punt@"))
                .count(),
            1,
            "{now}"
        );
        c.stop_agent(0, Signal::SIGTERM)?;
        let after = links(&c)?;
        assert!(!after.contains("sluice-"), "punt link left behind: {after}");
        Ok(())
    })());
}

/// Egress policy also governs the node and the outside world: the XDP program sends everything a
/// selected pod emits to the workers, which hand allowed frames back to the kernel through the
/// punt link (routed and masqueraded there) and drop the rest; with the agent dead those frames
/// are dropped, while an unselected pod keeps reaching the outside through the kernel.
#[test]
fn egress_policy_covers_the_node_and_the_outside() {
    if !require_root() {
        return;
    }
    check((|| {
        let mut c = Cluster::new(&[NodeKind::Sluice; 2], AgentOptions::default())?;
        // Node 1's underlay address stands for the outside world; node 0's own is host-bound.
        let (outside, own) = (c.nodes[1].underlay_ip, c.nodes[0].underlay_ip);
        let policy = format!(
            r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: egress-a, namespace: default}}
spec:
  podSelector: {{matchLabels: {{app: a}}}}
  policyTypes: [Egress]
  egress:
    - to: [{{ipBlock: {{cidr: {outside}/32}}}}]
"#
        );
        let policies = c.write_manifest("policies.yaml", &policy)?;
        // Strict reverse-path filtering on node 0 (`all` and `default`, as a hardened host has
        // it), set before the agent starts: the punt link, the pods' veths and the workers must
        // all work under it (the agent masquerades what leaves the cluster).
        sluice_e2e::sh(
            &c.nodes[0].ns,
            "sysctl -qw net.ipv4.conf.all.rp_filter=1 net.ipv4.conf.default.rp_filter=1",
        )?;
        c.start_agents(move |i, cfg| {
            if i == 0 {
                cfg.manifests.network_policies.push(policies.clone())
            }
        })?;
        let a = c.add_pod(0, &[("app", "a")])?;
        let b = c.add_pod(0, &[("app", "b")])?;
        let far = c.add_pod(1, &[("app", "far")])?;
        // Strict filtering does not get in the way of cluster traffic either.
        c.ping(b, c.pods[far].ip, 2)?;
        c.ping(far, c.pods[b].ip, 2)?;

        // Allowed outside address: through the worker and the punt link into the kernel.
        println!("{}", c.ping(a, outside, 3)?);
        // The node itself is not in the allow list: denied and counted.
        assert!(
            c.ping(a, own, 2).is_err(),
            "egress policy let the pod reach its node"
        );
        let f = c.wait_counters(0, |f| f.drops("policy_denied_egress") >= 2)?;
        let to_kernel: u64 = f.workers.iter().map(|w| w.to_kernel).sum();
        println!("to_kernel {to_kernel}, drops {:?}", f.workers[0].drops);
        assert!(
            to_kernel >= 3,
            "allowed frames did not go back to the kernel"
        );
        assert_eq!(f.drops("pass_after_redirect"), 0, "no punt link");
        // A pod no egress policy selects: its outside traffic never enters the workers.
        c.ping(b, own, 1)?;
        c.ping(b, outside, 1)?;

        // Agent dead: the selected pod fails closed, the other fails open.
        c.stop_agent(0, Signal::SIGKILL)?;
        assert!(
            c.ping(a, outside, 2).is_err(),
            "egress-isolated pod got out without its agent"
        );
        c.ping(b, outside, 1)?;
        Ok(())
    })());
}
