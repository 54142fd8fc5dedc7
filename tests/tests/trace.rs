//! `sluicectl trace` end to end (run as root): two netns nodes running the real agent, the demo's
//! shape (a client on n0, a Service whose backend is on n1, a database on n1 isolated for ingress),
//! each flow traced through both agents' sockets and then sent for real; the trace's verdict must
//! be what the traffic met (the answer, or the drop reason `observe` reports).

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

fn sockets(c: &Cluster) -> Vec<String> {
    c.nodes
        .iter()
        .enumerate()
        .flat_map(|(i, n)| {
            [
                "--agent-socket".to_owned(),
                format!("n{i}={}", n.socket().display()),
            ]
        })
        .collect()
}

/// `sluicectl trace <args>` over every node's agent: the JSON document, and the table (printed).
fn trace(c: &Cluster, args: &[&str]) -> Result<serde_json::Value> {
    let run = |output: &str| -> Result<String> {
        let out = Command::new(sluicectl()?)
            .arg("trace")
            .args(sockets(c))
            .args(["-o", output])
            .args(args)
            .output()
            .map_err(setup)?;
        if !out.status.success() {
            return Err(setup(format!(
                "sluicectl trace {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    println!("$ sluicectl trace {}\n{}", args.join(" "), run("table")?);
    let json = run("json")?;
    serde_json::from_str(json.trim()).map_err(|e| setup(format!("{e}: {json}")))
}

/// `sluicectl observe -o json` on node `i`.
fn observe(c: &Cluster, i: usize, args: &[&str]) -> Result<Vec<serde_json::Value>> {
    let out = Command::new(sluicectl()?)
        .arg("observe")
        .arg("--agent-socket")
        .arg(c.nodes[i].socket())
        .args(["-o", "json"])
        .args(args)
        .output()
        .map_err(setup)?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).map_err(|e| setup(format!("{e}: {l}"))))
        .collect()
}

fn wait_drop(c: &Cluster, i: usize, dst: Ipv4Addr, within: Duration) -> Result<String> {
    let start = Instant::now();
    loop {
        let ev = observe(c, i, &["--verdict", "DROPPED", "--to", &dst.to_string()])?;
        if let Some(e) = ev.last() {
            return Ok(e["drop_reason"].as_str().unwrap_or_default().to_owned());
        }
        if start.elapsed() > within {
            return Err(setup(format!("no drop to {dst} on n{i} within {within:?}")));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn s<'a>(v: &'a serde_json::Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or_default()
}

/// The (stage, result) pairs of node `i` of a trace.
fn stages(t: &serde_json::Value, i: usize) -> Vec<(String, String)> {
    t["nodes"][i]["steps"]
        .as_array()
        .map(|v| {
            v.iter()
                .map(|st| (s(st, "stage").to_owned(), s(st, "result").to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

fn has(t: &serde_json::Value, i: usize, stage: &str, result: &str) -> bool {
    stages(t, i).iter().any(|(a, b)| a == stage && b == result)
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
fn traces_agree_with_what_the_traffic_did() {
    if !require_root() {
        return;
    }
    check((|| {
        let mut c = Cluster::new(
            &[NodeKind::Sluice, NodeKind::Sluice],
            AgentOptions::default(),
        )?;
        let pol = c.write_manifest("policies.yaml", DENY)?;
        let svc = c.write_manifest("services.yaml", WEB_SERVICE)?;
        let eps = c.write_manifest(
            "endpointslices.yaml",
            &web_endpoints(&[Ipv4Addr::new(10, 244, 2, 3)]),
        )?;
        c.start_agents(|_, cfg| {
            cfg.manifests.network_policies.push(pol.clone());
            cfg.manifests.services.push(svc.clone());
            cfg.manifests.endpoint_slices.push(eps.clone());
        })?;
        let client = c.add_pod(0, &[("role", "client")])?; // default/n0p0, 10.244.1.2
        let db = c.add_pod(1, &[("app", "db")])?; // default/n1p0, 10.244.2.2
        let web = c.add_pod(1, &[("app", "web")])?; // default/n1p1, 10.244.2.3
        c.tcp_echo_server(db, 8080)?;
        c.tcp_echo_server(web, 8080)?;
        let (db_ip, web_ip) = (c.pods[db].ip, c.pods[web].ip);
        assert_eq!(web_ip, Ipv4Addr::new(10, 244, 2, 3));

        // 1. Allowed through the Service: n0 balances to the backend on n1 and encapsulates; n1
        // decapsulates, finds the backend's ingress open and delivers.
        let t = trace(
            &c,
            &[
                "--from",
                "default/n0p0",
                "--to",
                "svc/default/web:http",
                "--sport",
                "2345",
            ],
        )?;
        assert_eq!(s(&t, "verdict"), "FORWARDED", "{t}");
        assert_eq!(t["nodes"].as_array().map(Vec::len), Some(2), "{t}");
        assert_eq!(s(&t["nodes"][0], "node"), "n0");
        assert_eq!(s(&t["nodes"][1], "node"), "n1");
        assert!(has(&t, 0, "conntrack", "miss"), "{t}");
        assert!(has(&t, 0, "service", "backend"), "{t}");
        assert!(has(&t, 0, "nat", "dnat"), "{t}");
        assert!(has(&t, 0, "route", "remote"), "{t}");
        assert_eq!(s(&t["nodes"][0], "next_node"), "n1");
        assert!(has(&t, 1, "decap", "ok"), "{t}");
        assert!(has(&t, 1, "policy", "allowed"), "{t}");
        assert!(has(&t, 1, "route", "local"), "{t}");
        let detail = t["nodes"][0]["steps"].to_string();
        assert!(detail.contains("10.244.2.3:8080"), "{detail}");
        // What the traffic did: the backend answers through the Service.
        let reply = Cluster::tcp_lines(&c.pods[client].ns, WEB_VIP, 80, &["hi"])?;
        assert_eq!(reply.len(), 1, "{reply:?}");

        // 2. Denied by the database's ingress policy, decided on its node.
        let to_db = format!("{db_ip}:8080");
        let t = trace(&c, &["--from", "default/n0p0", "--to", &to_db])?;
        assert_eq!(s(&t, "verdict"), "DROPPED", "{t}");
        assert_eq!(s(&t, "drop_reason"), "policy_denied_ingress", "{t}");
        assert_eq!(s(&t["nodes"][0], "verdict"), "FORWARDED", "{t}");
        assert!(has(&t, 1, "policy", "denied"), "{t}");
        assert!(
            t["nodes"][1]["steps"]
                .to_string()
                .contains("default/deny-db"),
            "the deciding policy is named: {t}"
        );
        // tcpdump in the client pod records the SYN as it left; `--pcap` traces that frame.
        let pcap = c.nodes[0].dir.join("syn.pcap");
        let mut tcpdump = Command::new("ip")
            .args([
                "netns",
                "exec",
                &c.pods[client].ns,
                "timeout",
                "10",
                "tcpdump",
            ])
            .args(["-i", "eth0", "-U", "-c", "1", "-w"])
            .arg(&pcap)
            .arg(format!("tcp[tcpflags] & tcp-syn != 0 and dst host {db_ip}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| setup(format!("tcpdump: {e}")))?;
        std::thread::sleep(Duration::from_millis(700));
        let ns = c.pods[client].ns.clone();
        let attempt = std::thread::spawn(move || Cluster::tcp_lines(&ns, db_ip, 8080, &["x"]));
        let reason = wait_drop(&c, 1, db_ip, Duration::from_secs(3))?;
        assert_eq!(reason, "policy_denied_ingress");
        let got = attempt.join().map_err(|_| setup("attempt panicked"))?;
        assert!(
            got.map(|r| r.is_empty()).unwrap_or(true),
            "the denied connection got an answer"
        );
        let captured = tcpdump.wait().map_err(setup)?;
        assert!(captured.success(), "tcpdump caught no SYN: {captured}");
        let t = trace(&c, &["--pcap", &pcap.display().to_string()])?;
        assert_eq!(s(&t, "drop_reason"), "policy_denied_ingress", "{t}");
        assert_eq!(t["nodes"].as_array().map(Vec::len), Some(2), "{t}");

        // 3. No route: an address of n0's pod CIDR that no pod holds.
        let nobody = Ipv4Addr::new(10, 244, 1, 200);
        let t = trace(
            &c,
            &[
                "--from",
                "default/n0p0",
                "--to",
                &nobody.to_string(),
                "--protocol",
                "icmp",
            ],
        )?;
        assert_eq!(s(&t, "drop_reason"), "no_route", "{t}");
        assert!(has(&t, 0, "route", "no_route"), "{t}");
        let _ = c.ping(client, nobody, 2);
        assert_eq!(
            wait_drop(&c, 0, nobody, Duration::from_secs(2))?,
            "no_route"
        );

        // 4. Traces change nothing: the first trace's tuple (source port 2345, outside the
        // kernel's ephemeral range, so no real connection used it) is still a miss on both nodes.
        let again = trace(
            &c,
            &[
                "--from",
                "default/n0p0",
                "--to",
                "svc/default/web:http",
                "--sport",
                "2345",
            ],
        )?;
        assert!(has(&again, 0, "conntrack", "miss"), "{again}");
        assert!(has(&again, 1, "conntrack", "miss"), "{again}");

        // Bad input is refused with a clear message.
        let out = Command::new(sluicectl()?)
            .arg("trace")
            .args(sockets(&c))
            .args(["--from", "default/nobody", "--to", "10.96.0.10:80"])
            .output()
            .map_err(setup)?;
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("default/nobody"), "{err}");
        Ok(())
    })());
}
