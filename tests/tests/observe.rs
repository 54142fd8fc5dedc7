//! Observability end to end (run as root): flow events through `sluicectl observe` and the
//! agent's Prometheus metrics, on a netns cluster built by the harness.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sluice_e2e::manifests::{WEB_SERVICE, WEB_VIP, web_endpoints};
use sluice_e2e::{AgentOptions, Cluster, HarnessError, NodeKind, Result, require_root};

fn check(r: Result<()>) {
    if let Err(e) = r {
        panic!("{e}");
    }
}

fn setup(e: impl std::fmt::Display) -> HarnessError {
    HarnessError::Setup(e.to_string())
}

/// `$SLUICECTL_BIN`, else `<workspace>/target/debug/sluicectl`.
fn sluicectl() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("SLUICECTL_BIN") {
        return Ok(p.into());
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/sluicectl");
    if p.exists() {
        Ok(p)
    } else {
        Err(setup(format!(
            "sluicectl not built at {}: run `cargo build -p sluice-control --bin sluicectl`",
            p.display()
        )))
    }
}

/// `sluicectl observe -o json <args>` against node `i`'s agent: one JSON object per line.
fn observe(c: &Cluster, i: usize, args: &[&str]) -> Result<Vec<serde_json::Value>> {
    let out = Command::new(sluicectl()?)
        .arg("observe")
        .arg("--agent-socket")
        .arg(c.nodes[i].socket())
        .args(["-o", "json"])
        .args(args)
        .output()
        .map_err(setup)?;
    if !out.status.success() {
        return Err(setup(format!(
            "sluicectl observe failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).map_err(|e| setup(format!("{e}: {l}"))))
        .collect()
}

/// Poll `observe` until an event satisfies `want` (events are drained every 50 ms).
fn wait_event(
    c: &Cluster,
    i: usize,
    args: &[&str],
    within: Duration,
    want: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    let start = Instant::now();
    loop {
        if let Some(e) = observe(c, i, args)?.into_iter().find(|e| want(e)) {
            return Ok(e);
        }
        if start.elapsed() > within {
            return Err(setup(format!(
                "no matching event within {within:?}; events: {:?}",
                observe(c, i, &[])?
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn s<'a>(e: &'a serde_json::Value, k: &str) -> &'a str {
    e[k].as_str().unwrap_or_default()
}

const DENY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-db, namespace: default}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress]
"#;

#[test]
fn denied_connection_service_backend_and_exact_counters() {
    if !require_root() {
        return;
    }
    check((|| {
        let mut c = Cluster::new(&[NodeKind::Sluice], AgentOptions::default())?;
        let pol = c.write_manifest("policies.yaml", DENY)?;
        let svc = c.write_manifest("services.yaml", WEB_SERVICE)?;
        let eps = c.write_manifest(
            "endpointslices.yaml",
            &web_endpoints(&[Ipv4Addr::new(10, 244, 1, 4)]),
        )?;
        c.start_agents(|_, cfg| {
            cfg.manifests.network_policies.push(pol.clone());
            cfg.manifests.services.push(svc.clone());
            cfg.manifests.endpoint_slices.push(eps.clone());
            cfg.metrics_listen = Some("127.0.0.1:9478".parse().expect("address"));
        })?;
        let client = c.add_pod(0, &[("role", "client")])?; // default/n0p0, 10.244.1.2
        let db = c.add_pod(0, &[("app", "db")])?; // default/n0p1, 10.244.1.3
        let web = c.add_pod(0, &[("app", "web")])?; // default/n0p2, 10.244.1.4
        c.tcp_echo_server(db, 8080)?;
        c.tcp_echo_server(web, 8080)?;
        let db_ip = c.pods[db].ip;

        // 1. A denied connection: both pods, the port and the reason, within a second.
        // The connection attempt runs meanwhile: the event must be visible within a second of
        // the first SYN (the attempt itself retries for longer).
        let ns = c.pods[client].ns.clone();
        let attempt = std::thread::spawn(move || {
            let _ = Cluster::tcp_lines(&ns, db_ip, 8080, &["x"]);
        });
        let e = wait_event(
            &c,
            0,
            &["--verdict", "DROPPED", "--port", "8080"],
            Duration::from_secs(1),
            |e| s(e, "dst_ip") == db_ip.to_string(),
        )?;
        println!("denied: {e}");
        let _ = attempt.join();
        assert_eq!(s(&e, "src_pod"), "default/n0p0");
        assert_eq!(s(&e, "dst_pod"), "default/n0p1");
        assert_eq!(e["dst_port"], 8080);
        assert_eq!(s(&e, "protocol"), "TCP");
        assert_eq!(s(&e, "drop_reason"), "policy_denied_ingress");
        assert_eq!(s(&e, "policy"), "default-deny");
        assert_eq!(s(&e, "policy_direction"), "ingress");

        // The same in the table form (printed for the record; the JSON above is asserted).
        let table = Command::new(sluicectl()?)
            .arg("observe")
            .arg("--agent-socket")
            .arg(c.nodes[0].socket())
            .args([
                "--verdict",
                "DROPPED",
                "--pod",
                "default/n0p0",
                "--last",
                "5",
            ])
            .output()
            .map_err(setup)?;
        println!("{}", String::from_utf8_lossy(&table.stdout));
        assert!(String::from_utf8_lossy(&table.stdout).contains("policy_denied_ingress"));

        // 2. A service connection names the chosen backend.
        let reply = Cluster::tcp_lines(&c.pods[client].ns, WEB_VIP, 80, &["hi"])?;
        assert_eq!(reply.len(), 1, "{reply:?}");
        let e = wait_event(
            &c,
            0,
            &["--verdict", "FORWARDED", "--to", "10.96.0.10"],
            Duration::from_secs(1),
            |e| s(e, "kind") == "new_connection",
        )?;
        println!("service: {e}");
        let table = Command::new(sluicectl()?)
            .arg("observe")
            .arg("--agent-socket")
            .arg(c.nodes[0].socket())
            .args(["--to", "10.96.0.10"])
            .output()
            .map_err(setup)?;
        println!("{}", String::from_utf8_lossy(&table.stdout));
        assert_eq!(s(&e, "backend_ip"), "10.244.1.4");
        assert_eq!(s(&e, "backend_pod"), "default/n0p2");
        assert_eq!(e["backend_port"], 8080);
        assert_eq!(s(&e, "service"), "default/web:http");

        // 3. Exact counters: N pings to an address with no pod are N no_route drops.
        let scrape = |what: &str| -> Result<String> {
            let out = Command::new("ip")
                .args(["netns", "exec", &c.nodes[0].ns, "busybox", "wget", "-qO-"])
                .arg("http://127.0.0.1:9478/metrics")
                .output()
                .map_err(setup)?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if text.is_empty() {
                return Err(setup(format!("empty scrape ({what})")));
            }
            Ok(text)
        };
        let no_route = |text: &str| -> u64 {
            text.lines()
                .filter(|l| {
                    l.starts_with("sluice_agent_drops_total{") && l.contains("reason=\"no_route\"")
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum()
        };
        let before = no_route(&scrape("before")?);
        const N: u64 = 5;
        let _ = c.ping(client, Ipv4Addr::new(10, 244, 1, 200), N as u32);
        let start = Instant::now();
        let text = loop {
            let t = scrape("after")?;
            if no_route(&t) >= before + N || start.elapsed() > Duration::from_secs(3) {
                break t;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(no_route(&text) - before, N, "{text}");
        let ev = observe(&c, 0, &["--verdict", "DROPPED", "--to", "10.244.1.200"])?;
        assert_eq!(ev.len() as u64, N, "one drop event per ping: {ev:?}");

        // Conntrack holds the service flow; XDP is attached to the uplink and the pods.
        let value = |prefix: &str| -> Option<u64> {
            text.lines()
                .find(|l| l.starts_with(prefix))
                .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        };
        assert!(
            value("sluice_agent_conntrack_entries{worker=\"0\"}").is_some_and(|n| n >= 1),
            "{text}"
        );
        let attached = text
            .lines()
            .filter(|l| l.starts_with("sluice_agent_xdp_attached{") && l.ends_with(" 1"))
            .count();
        assert_eq!(attached, 4, "uplink and three pods: {text}");
        // Bytes both ways, busy time, and the publish latency of the three pods' tables.
        for m in [
            "sluice_agent_bytes_total{worker=\"0\",direction=\"rx\"}",
            "sluice_agent_bytes_total{worker=\"0\",direction=\"tx\"}",
        ] {
            assert!(value(m).is_some_and(|n| n > 0), "{m}: {text}");
        }
        let busy = text
            .lines()
            .find(|l| l.starts_with("sluice_agent_worker_busy_seconds_total{worker=\"0\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
        assert!(busy.is_some_and(|b| b > 0.0), "{text}");
        assert!(
            value("sluice_agent_table_publish_seconds_count").is_some_and(|n| n >= 3),
            "{text}"
        );
        for l in text.lines().filter(|l| {
            [
                "sluice_agent_bytes_total",
                "sluice_agent_worker_busy",
                "sluice_agent_table_publish_seconds_count",
                "sluice_agent_table_publish_seconds_sum",
                "sluice_agent_xsk_",
                "sluice_agent_umem_frames",
            ]
            .iter()
            .any(|p| l.starts_with(p))
        }) {
            println!("{l}");
        }
        // AF_XDP sockets: the pods' sockets received the pings; the UMEM has frames on fill rings.
        let xsk_rx: u64 = text
            .lines()
            .filter(|l| {
                l.starts_with("sluice_agent_xsk_packets_total{") && l.contains("direction=\"rx\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        assert!(xsk_rx >= N, "{text}");
        assert!(
            value("sluice_agent_umem_frames{worker=\"0\",state=\"fill\"}").is_some_and(|n| n > 0),
            "{text}"
        );
        // The kernel's own socket counters are exported (and it found no invalid descriptor).
        let kernel: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("sluice_agent_xsk_kernel_total{"))
            .collect();
        assert!(
            kernel
                .iter()
                .any(|l| l.contains("counter=\"rx_fill_ring_empty_descs\"")),
            "{text}"
        );
        assert!(
            kernel
                .iter()
                .filter(|l| l.contains("invalid_descs"))
                .all(|l| l.ends_with(" 0")),
            "{text}"
        );

        // The scrape is valid exposition text.
        let mut promtool = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .output_with_input(&text)?;
        assert!(promtool.0, "promtool: {}", promtool.1);
        promtool.1.clear();
        Ok(())
    })());
}

trait WithInput {
    fn output_with_input(&mut self, input: &str) -> Result<(bool, String)>;
}

impl WithInput for Command {
    fn output_with_input(&mut self, input: &str) -> Result<(bool, String)> {
        use std::io::Write;
        let mut child = self
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(setup)?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input.as_bytes()).map_err(setup)?;
        }
        let out = child.wait_with_output().map_err(setup)?;
        Ok((
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ))
    }
}
