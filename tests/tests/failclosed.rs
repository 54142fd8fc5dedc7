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
    const DENY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-db, namespace: default}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress]
"#;
    check((|| {
        let mut c = Cluster::new(&[NodeKind::Sluice], AgentOptions::default())?;
        let policies = c.write_manifest("policies.yaml", DENY)?;
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
        Ok(())
    })());
}
