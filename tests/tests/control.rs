//! The agent in control-plane mode (run as root): a two-node netns cluster whose agents follow a
//! real `sluice-control` (embedded redb store, TLS with certificates made here, a bearer token per
//! node and one operator token) listening on the underlay switch at 192.168.77.254; pods wired by
//! the real `sluice-cni`; objects applied with the real `sluicectl`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sluice_agent::config::{ControlConfig, UNLEASED_POD_CIDR};
use sluice_control::client::{ClientConfig, ControlClient};
use sluice_e2e::manifests::{WEB_VIP, web};
use sluice_e2e::{AgentOptions, Cluster, HarnessError, NodeKind, Result, in_ns, require_root, run};

const SERVER_IP: &str = "192.168.77.254";
const ENDPOINT: &str = "https://192.168.77.254:7443";
const OPERATOR_TOKEN: &str = "operator-token-0123456789abcdef";

fn node_token(i: usize) -> String {
    format!("node-n{i}-token-0123456789abcdef")
}

fn setup(e: impl std::fmt::Display) -> HarnessError {
    HarnessError::Setup(e.to_string())
}

fn check(r: Result<()>) {
    if let Err(e) = r {
        panic!("{e}");
    }
}

fn binary(env: &str, name: &str) -> Result<PathBuf> {
    if let Ok(p) = std::env::var(env) {
        return Ok(p.into());
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/debug")
        .join(name);
    if p.exists() {
        Ok(p)
    } else {
        Err(setup(format!(
            "{name} not built at {}: run `cargo build -p sluice-control --bins` or set {env}",
            p.display()
        )))
    }
}

/// A CA, a server certificate for 192.168.77.254 and `sluice-control`, and the tokens file.
fn make_certs(dir: &Path, nodes: usize) -> Result<()> {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let openssl = |args: &[&str]| {
        run(Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stderr(Stdio::piped()))
    };
    let mut a = vec!["req", "-x509"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=sluice-e2e-ca",
    ]);
    openssl(&a)?;
    let mut a = vec!["req"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=sluice-control",
    ]);
    openssl(&a)?;
    std::fs::write(
        dir.join("ext.cnf"),
        format!("subjectAltName=IP:{SERVER_IP},DNS:sluice-control\n"),
    )
    .map_err(setup)?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ])?;
    let mut tokens = format!("operator admin {OPERATOR_TOKEN}\n");
    for i in 0..nodes {
        tokens.push_str(&format!("node n{i} {}\n", node_token(i)));
        std::fs::write(dir.join(format!("n{i}.token")), node_token(i)).map_err(setup)?;
    }
    std::fs::write(dir.join("tokens"), tokens).map_err(setup)?;
    Ok(())
}

/// `sluice-control` running in the switch namespace; SIGKILLed on drop.
struct ControlServer {
    ns: String,
    dir: PathBuf,
    child: Option<Child>,
}

impl ControlServer {
    fn start(ns: &str, dir: &Path) -> Result<Self> {
        let mut s = Self {
            ns: ns.to_owned(),
            dir: dir.to_owned(),
            child: None,
        };
        s.restart()?;
        Ok(s)
    }

    fn restart(&mut self) -> Result<()> {
        let bin = binary("SLUICE_CONTROL_BIN", "sluice-control")?;
        let d = |f: &str| self.dir.join(f).to_string_lossy().into_owned();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("control.log"))
            .map_err(setup)?;
        let child = in_ns(
            &self.ns,
            &[
                &bin.to_string_lossy(),
                "--listen",
                &format!("{SERVER_IP}:7443"),
                "--tls-cert",
                &d("server.pem"),
                "--tls-key",
                &d("server.key"),
                "--tokens",
                &d("tokens"),
                "--data-dir",
                &d("data"),
            ],
        )
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(setup)?)
        .stderr(log)
        .spawn()
        .map_err(|e| setup(format!("spawn sluice-control: {e}")))?;
        self.child = Some(child);
        // Wait until it answers.
        let deadline = Instant::now() + Duration::from_secs(20);
        while sluicectl(&self.ns, &self.dir, &["status"]).is_err() {
            if Instant::now() > deadline {
                return Err(setup(format!(
                    "sluice-control did not come up: {}",
                    std::fs::read_to_string(self.dir.join("control.log")).unwrap_or_default()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Run `sluicectl args` in the switch namespace as the operator; returns stdout.
fn sluicectl(ns: &str, dir: &Path, args: &[&str]) -> Result<String> {
    let bin = binary("SLUICECTL_BIN", "sluicectl")?;
    let mut argv = vec![bin.to_string_lossy().into_owned()];
    argv.extend(args.iter().map(|s| s.to_string()));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = run(in_ns(ns, &argv)
        .env("SLUICE_SERVER", ENDPOINT)
        .env("SLUICE_CA", dir.join("ca.pem"))
        .env("SLUICE_TOKEN", OPERATOR_TOKEN))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Asks the control plane (from a thread inside the switch namespace) for the agents' synced
/// revisions, polling every 2 ms.
struct SyncWatcher {
    tx: mpsc::Sender<(u64, mpsc::Sender<std::result::Result<Instant, String>>)>,
}

impl SyncWatcher {
    fn start(ns: &str, ca: Vec<u8>, nodes: usize) -> Self {
        let (tx, rx) = mpsc::channel::<(u64, mpsc::Sender<std::result::Result<Instant, String>>)>();
        let ns = ns.to_owned();
        std::thread::spawn(move || {
            let f = match std::fs::File::open(format!("/var/run/netns/{ns}")) {
                Ok(f) => f,
                Err(_) => return,
            };
            if nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).is_err() {
                return;
            }
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            let cfg = ClientConfig::new(ENDPOINT)
                .with_token(OPERATOR_TOKEN)
                .with_ca_pem(ca);
            rt.block_on(async move {
                let mut client = None;
                while let Ok((target, reply)) = rx.recv() {
                    let deadline = Instant::now() + Duration::from_secs(30);
                    let r = loop {
                        if client.is_none() {
                            client = ControlClient::connect(&cfg).await.ok();
                        }
                        if let Some(c) = &client
                            && let Ok(s) = c.status().await
                            && (0..nodes).all(|i| {
                                s.agents.iter().any(|a| {
                                    a.node == format!("n{i}") && a.synced_revision >= target
                                })
                            })
                        {
                            break Ok(Instant::now());
                        }
                        if Instant::now() > deadline {
                            break Err(format!("agents never reported revision {target}"));
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    };
                    let _ = reply.send(r);
                }
            });
        });
        Self { tx }
    }

    /// When every agent had reported `revision` (or later).
    fn synced(&self, revision: u64) -> Result<Instant> {
        let (tx, rx) = mpsc::channel();
        self.tx.send((revision, tx)).map_err(setup)?;
        rx.recv_timeout(Duration::from_secs(40))
            .map_err(setup)?
            .map_err(setup)
    }
}

/// The control-plane cluster: switch-side server, two agents in control mode.
struct Setup {
    c: Cluster,
    server: ControlServer,
    watcher: SyncWatcher,
    dir: PathBuf,
}

impl Setup {
    fn new() -> Result<Self> {
        let mut c = Cluster::new(&[NodeKind::Sluice; 2], AgentOptions::default())?;
        let dir = c
            .write_manifest("control-marker", "")?
            .with_file_name("control");
        std::fs::create_dir_all(&dir).map_err(setup)?;
        make_certs(&dir, 2)?;
        sluice_e2e::ip(Some(&c.switch), &format!("addr add {SERVER_IP}/24 dev br0"))?;
        let server = ControlServer::start(&c.switch, &dir)?;
        let d = dir.clone();
        c.start_agents(move |i, cfg| {
            cfg.pod_cidr = UNLEASED_POD_CIDR;
            cfg.peers.clear();
            cfg.control = Some(ControlConfig {
                endpoint: ENDPOINT.into(),
                ca_file: Some(d.join("ca.pem")),
                token_file: Some(d.join(format!("n{i}.token"))),
                tls_domain: Some("sluice-control".into()),
            });
        })?;
        let ca = std::fs::read(dir.join("ca.pem")).map_err(setup)?;
        let watcher = SyncWatcher::start(&c.switch, ca, 2);
        Ok(Self {
            c,
            server,
            watcher,
            dir,
        })
    }

    fn ctl(&self, args: &[&str]) -> Result<String> {
        sluicectl(&self.c.switch, &self.dir, args)
    }

    /// `sluicectl apply -f` a manifest; returns (revision, when apply returned).
    fn apply(&self, name: &str, yaml: &str) -> Result<(u64, Instant)> {
        let p = self.c.write_manifest(name, yaml)?;
        let out = self.ctl(&["apply", "-f", &p.to_string_lossy()])?;
        let t = Instant::now();
        let rev = out
            .lines()
            .find_map(|l| l.strip_prefix("revision "))
            .and_then(|r| r.trim().parse().ok())
            .ok_or_else(|| setup(format!("no revision in apply output: {out}")))?;
        Ok((rev, t))
    }

    /// Apply and wait until both agents report it; returns the delay.
    fn apply_synced(&self, name: &str, yaml: &str) -> Result<(u64, Duration)> {
        let (rev, t) = self.apply(name, yaml)?;
        let done = self.watcher.synced(rev)?;
        Ok((rev, done.saturating_duration_since(t)))
    }
}

const NAMESPACE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {team: e2e}}
"#;

const DENY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-deny, namespace: default}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
"#;

const ALLOW: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-allow-clients, namespace: default}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
  ingress:
    - from: [{podSelector: {matchLabels: {role: client}}}]
      ports: [{port: 8080, protocol: TCP}]
"#;

const VIP: Ipv4Addr = WEB_VIP;

/// `n` connections to the VIP from namespace `ns`; backend -> connections served.
fn spread(ns: &str, n: usize) -> Result<BTreeMap<String, usize>> {
    let mut served = BTreeMap::new();
    for i in 0..n {
        let line = format!("c{i}");
        let reply = Cluster::tcp_lines(ns, VIP, 80, &[&line])?;
        let (backend, echoed) = reply
            .first()
            .and_then(|r| r.split_once(' '))
            .ok_or_else(|| setup(format!("connection {i} to the VIP got {reply:?}")))?;
        assert_eq!(echoed, line);
        *served.entry(backend.to_owned()).or_default() += 1;
    }
    Ok(served)
}

fn connects(ns: &str) -> bool {
    Cluster::tcp_lines(ns, VIP, 80, &["x"]).is_ok_and(|r| !r.is_empty())
}

/// Retry `f` until it holds (up to 20 s); returns when it first held.
fn until(what: &str, mut f: impl FnMut() -> bool) -> Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if f() {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            return Err(setup(format!("never: {what}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Everything the issue's Done-when asks of the agents: Service and NetworkPolicy applied with
/// `sluicectl` change traffic on both nodes; `sluicectl nodes`/`status` show both synced; the
/// apply -> synced delay over several applies; the control plane killed and restarted under
/// running agents, which converge to a change applied after the restart.
#[test]
fn control_plane_drives_two_nodes() {
    if !require_root() {
        return;
    }
    check((|| {
        let mut s = Setup::new()?;
        // Leases came from the control plane, in registration order.
        let nodes = s.ctl(&["nodes"])?;
        println!("{nodes}");
        assert!(nodes.contains("10.244.1.0/24") && nodes.contains("10.244.2.0/24"));

        // Pods through the real CNI (NodeInfo answers the leased CIDR); backends on both nodes.
        let client = s.c.add_pod_cni(0, &[("role", "client")])?;
        let other = s.c.add_pod_cni(0, &[("role", "other")])?;
        let mut backends = Vec::new();
        for node in [0, 1, 1] {
            let p = s.c.add_pod_cni(node, &[("app", "web")])?;
            s.c.tcp_echo_server(p, 8080)?;
            backends.push(s.c.pods[p].ip);
        }
        println!(
            "pods: {:?}",
            s.c.pods.iter().map(|p| p.ip).collect::<Vec<_>>()
        );
        let cns = s.c.pods[client].ns.clone();
        let ons = s.c.pods[other].ns.clone();

        // The agents reported their pods (ReportPod from AddPod).
        until("every pod is reported", || {
            s.ctl(&["get", "pods", "-o", "json"]).is_ok_and(|j| {
                s.c.pods
                    .iter()
                    .all(|p| j.contains(&format!("\"{}\"", p.ip)))
            })
        })?;

        let mut delays = Vec::new();
        // Namespace + Service + EndpointSlice: the VIP answers, spread over both nodes.
        let (rev, t) = s.apply("web.yaml", &format!("{NAMESPACE}---\n{}", web(&backends)))?;
        let first_ok = until("the VIP answers", || connects(&cns))?;
        delays.push(ms(s.watcher.synced(rev)?.saturating_duration_since(t)));
        println!(
            "service: revision {rev}, apply -> first connection through the VIP {:.1} ms",
            ms(first_ok.saturating_duration_since(t))
        );
        let served = spread(&cns, 24)?;
        println!("connections per backend: {served:?}");
        let want: BTreeSet<String> = backends.iter().map(|b| b.to_string()).collect();
        assert_eq!(served.keys().cloned().collect::<BTreeSet<_>>(), want);

        // Default deny for app=web: connections fail, the drops carry the policy reason.
        let (rev, t) = s.apply("deny.yaml", DENY)?;
        delays.push(ms(s.watcher.synced(rev)?.saturating_duration_since(t)));
        for _ in 0..6 {
            assert!(!connects(&cns), "a connection passed the default deny");
        }
        let denied = |c: &Cluster| {
            (0..2)
                .map(|n| {
                    c.nodes[n]
                        .counters()
                        .map_or(0, |f| f.drops("policy_denied_ingress"))
                })
                .sum::<u64>()
        };
        until("policy drops are counted", || denied(&s.c) > 0)?;
        println!("policy_denied_ingress drops: {}", denied(&s.c));

        // Allow role=client on 8080: the client gets through (also to node 1's backends, which
        // know the client's labels from the control plane), others do not.
        let (rev, t) = s.apply("allow.yaml", ALLOW)?;
        let first_ok = until("the allowed client connects", || connects(&cns))?;
        delays.push(ms(s.watcher.synced(rev)?.saturating_duration_since(t)));
        println!(
            "allow: revision {rev}, apply -> first allowed connection {:.1} ms",
            ms(first_ok.saturating_duration_since(t))
        );
        let served = spread(&cns, 24)?;
        println!("allowed connections per backend: {served:?}");
        assert_eq!(served.keys().cloned().collect::<BTreeSet<_>>(), want);
        assert!(!connects(&ons), "role=other passed the policy");

        // A Pod manifest relabels the other pod role=client: the control plane's labels win
        // over the ones the CNI reported, and the policy lets it through.
        let relabel = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: default, labels: {{role: client}}}}\n",
            s.c.pods[other].container_id
        );
        let (rev, t) = s.apply("relabel.yaml", &relabel)?;
        let first_ok = until("the relabelled pod connects", || connects(&ons))?;
        delays.push(ms(s.watcher.synced(rev)?.saturating_duration_since(t)));
        println!(
            "relabel: revision {rev}, apply -> first allowed connection {:.1} ms",
            ms(first_ok.saturating_duration_since(t))
        );

        // CNI DEL: the agent removes the pod from the control plane.
        let gone = s.c.pods[other].ip;
        s.c.del_pod_cni(other)?;
        until("the deleted pod leaves the control plane", || {
            s.ctl(&["get", "pods", "-o", "json"])
                .is_ok_and(|j| !j.contains(&format!("\"{gone}\"")))
        })?;

        // Several more applies (a policy selecting nothing, changed each time) for the figures.
        for i in 0..10 {
            let yaml = format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: noop, namespace: default}}\nspec:\n  podSelector: {{matchLabels: {{app: none{i}}}}}\n  policyTypes: [Ingress]\n"
            );
            let (_, d) = s.apply_synced("noop.yaml", &yaml)?;
            delays.push(ms(d));
        }

        let status = s.ctl(&["status"])?;
        println!("{status}");
        let status_json: serde_json::Value =
            serde_json::from_str(&s.ctl(&["status", "-o", "json"])?).map_err(setup)?;
        let revision = status_json["revision"].as_u64().unwrap_or(0);
        for n in ["n0", "n1"] {
            let a = status_json["agents"]
                .as_array()
                .and_then(|l| l.iter().find(|a| a["node"] == n))
                .ok_or_else(|| setup(format!("{n} missing from status: {status_json}")))?;
            assert_eq!(a["connected"], true, "{n}: {a}");
            assert_eq!(a["syncedRevision"].as_u64(), Some(revision), "{n}: {a}");
        }
        println!("{}", s.ctl(&["nodes"])?);
        for n in 0..2 {
            let (ready, note) = s.c.agent_status(n)?;
            assert!(ready && note.is_empty(), "agent {n}: {ready} {note:?}");
        }

        let mut sorted = delays.clone();
        sorted.sort_by(f64::total_cmp);
        println!(
            "apply -> both agents synced over {} applies: p50 {:.1} ms, max {:.1} ms, all {:?}",
            sorted.len(),
            sorted[sorted.len() / 2],
            sorted[sorted.len() - 1],
            delays.iter().map(|d| format!("{d:.1}")).collect::<Vec<_>>()
        );

        // Kill the control plane under the running agents: they keep serving and say so.
        s.server.kill();
        until("agent 0 notes it is not synced", || {
            s.c.agent_status(0)
                .is_ok_and(|(ready, note)| ready && note.contains("not synced"))
        })?;
        println!("agent 0 status while down: {:?}", s.c.agent_status(0)?);
        assert!(
            connects(&cns),
            "traffic stopped with the control plane down"
        );

        // Restart it; a change applied afterwards reaches both nodes' data paths: the service
        // keeps only node 1's first backend.
        let t_restart = Instant::now();
        s.server.restart()?;
        let only = backends[1];
        let (rev, t) = s.apply("web.yaml", &web(&[only]))?;
        let synced = s.watcher.synced(rev)?;
        println!(
            "after restart: revision {rev} synced on both {:.1} ms after apply ({:.1} ms after the restart began)",
            ms(synced.saturating_duration_since(t)),
            ms(synced.saturating_duration_since(t_restart))
        );
        let served = spread(&cns, 8)?;
        assert_eq!(
            served.keys().cloned().collect::<Vec<_>>(),
            vec![only.to_string()]
        );
        until("agents note they are synced again", || {
            (0..2).all(|n| {
                s.c.agent_status(n)
                    .is_ok_and(|(ready, note)| ready && note.is_empty())
            })
        })?;
        Ok(())
    })());
}

/// An agent (re)started while the control plane is down serves with its cached lease and pods
/// and the objects of the revision it last applied (peers included: cross-node traffic flows at
/// once), says it is not synced, and converges once the control plane is back.
#[test]
fn agent_starts_while_the_control_plane_is_down() {
    if !require_root() {
        return;
    }
    check((|| {
        let mut s = Setup::new()?;
        let a = s.c.add_pod_cni(0, &[])?;
        let b = s.c.add_pod_cni(1, &[])?;
        let b_ip = s.c.pods[b].ip;
        s.c.ping(a, b_ip, 2)?;

        s.c.stop_agent(1, nix::sys::signal::Signal::SIGTERM)?;
        s.server.kill();
        s.c.start_agent(1)?;
        until(
            "agent 1 says it is not synced and serves its kept revision",
            || {
                s.c.agent_status(1).is_ok_and(|(ready, note)| {
                    ready && note.contains("not synced") && note.contains("kept before the restart")
                })
            },
        )?;
        println!(
            "agent 1 started without the control plane: {:?}",
            s.c.agent_status(1)?
        );
        // Node 0 still has its tables; node 1 its pod and the peers of its kept revision.
        println!("{}", s.c.ping(a, b_ip, 2)?);

        let t = Instant::now();
        s.server.restart()?;
        let st: serde_json::Value =
            serde_json::from_str(&s.ctl(&["status", "-o", "json"])?).map_err(setup)?;
        let rev = st["revision"].as_u64().unwrap_or(0);
        let synced = s.watcher.synced(rev)?;
        println!(
            "both agents synced revision {rev} {:.1} ms after the control plane restart began",
            ms(synced.saturating_duration_since(t))
        );
        until("agent 1 notes it is synced", || {
            s.c.agent_status(1)
                .is_ok_and(|(ready, note)| ready && note.is_empty())
        })?;
        println!("{}", s.c.ping(a, b_ip, 3)?);
        Ok(())
    })());
}

/// `sluicectl observe --follow -o json ARGS` against the control plane, in the switch namespace:
/// each JSON line with the instant it was read. The process is killed on drop.
struct Follower {
    child: Child,
    lines: mpsc::Receiver<(Instant, serde_json::Value)>,
}

impl Follower {
    fn start(s: &Setup, args: &[&str]) -> Result<Self> {
        let bin = binary("SLUICECTL_BIN", "sluicectl")?;
        let mut argv = vec![
            bin.to_string_lossy().into_owned(),
            "observe".into(),
            "--follow".into(),
            "-o".into(),
            "json".into(),
        ];
        argv.extend(args.iter().map(|a| a.to_string()));
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let mut child = in_ns(&s.c.switch, &argv)
            .env("SLUICE_SERVER", ENDPOINT)
            .env("SLUICE_CA", s.dir.join("ca.pem"))
            .env("SLUICE_TOKEN", OPERATOR_TOKEN)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| setup(format!("spawn sluicectl observe --follow: {e}")))?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| setup("no stdout of sluicectl"))?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(out).lines() {
                let Ok(l) = l else { return };
                let t = Instant::now();
                if let Ok(v) = serde_json::from_str(&l)
                    && tx.send((t, v)).is_err()
                {
                    return;
                }
            }
        });
        Ok(Self { child, lines })
    }

    /// The first event with `src_port` within `within`, with when it was read.
    fn wait_src_port(
        &self,
        port: u16,
        within: Duration,
    ) -> Result<Option<(Instant, serde_json::Value)>> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((t, v)) if v["src_port"] == port => return Ok(Some((t, v))),
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => return Ok(None),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(setup("sluicectl observe --follow exited"));
                }
            }
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One TCP connection attempt from `ns` with a chosen source port, in the background.
fn attempt(ns: &str, to: Ipv4Addr, port: u16, source_port: u16) -> Result<Child> {
    in_ns(
        ns,
        &[
            "socat",
            "-T",
            "1",
            "/dev/null",
            &format!("TCP:{to}:{port},connect-timeout=1,sourceport={source_port},reuseaddr"),
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .map_err(|e| setup(format!("spawn socat: {e}")))
}

fn text<'a>(e: &'a serde_json::Value, k: &str) -> &'a str {
    e[k].as_str().unwrap_or_default()
}

/// Flow events through the control plane: a connection denied by NetworkPolicy between pods of
/// two nodes shows up in `sluicectl observe --follow --verdict DROPPED -o json` (no
/// `--agent-socket`: the agents push to sluice-control) with the node that dropped it, both pods,
/// the port and the reason, within one second of the attempt; `--node` selects nodes; the history
/// answers without `--follow`.
#[test]
fn denied_connection_is_observed_through_the_control_plane() {
    if !require_root() {
        return;
    }
    check((|| {
        let mut s = Setup::new()?;
        let client = s.c.add_pod_cni(0, &[("role", "client")])?;
        let web = s.c.add_pod_cni(1, &[("app", "web")])?;
        let web_ip = s.c.pods[web].ip;
        let cns = s.c.pods[client].ns.clone();
        let client_name = format!("default/{}", s.c.pods[client].container_id);
        let web_name = format!("default/{}", s.c.pods[web].container_id);
        until("both pods are reported", || {
            s.ctl(&["get", "pods", "-o", "json"])
                .is_ok_and(|j| j.contains(&format!("\"{web_ip}\"")))
        })?;
        s.apply_synced("deny.yaml", &format!("{NAMESPACE}---\n{DENY}"))?;

        let follower = Follower::start(&s, &["--verdict", "DROPPED"])?;
        // Until the follower's stream is open, attempts may pass unseen: repeat one until seen.
        let mut warm = None;
        for k in 0..40u16 {
            let mut a = attempt(&cns, web_ip, 8080, 40000 + k)?;
            let seen = follower.wait_src_port(40000 + k, Duration::from_millis(500))?;
            let _ = a.wait();
            if seen.is_some() {
                warm = seen;
                break;
            }
        }
        let (_, e) =
            warm.ok_or_else(|| setup("no denied connection seen through the control plane"))?;
        println!("first event through the control plane: {e}");

        // Measured: each attempt's event within one second of starting it.
        let mut delays = Vec::new();
        let mut node = String::new();
        for k in 0..10u16 {
            let port = 41000 + k;
            let t0 = Instant::now();
            let mut a = attempt(&cns, web_ip, 8080, port)?;
            let seen = follower.wait_src_port(port, Duration::from_secs(1))?;
            let _ = a.wait();
            let (t, e) = seen.ok_or_else(|| {
                setup(format!(
                    "the denied attempt from port {port} was not observed within 1 s"
                ))
            })?;
            assert_eq!(text(&e, "verdict"), "DROPPED", "{e}");
            assert_eq!(text(&e, "kind"), "policy_verdict", "{e}");
            assert_eq!(text(&e, "src_pod"), client_name, "{e}");
            assert_eq!(text(&e, "dst_pod"), web_name, "{e}");
            assert_eq!(text(&e, "dst_ip"), web_ip.to_string(), "{e}");
            assert_eq!(e["dst_port"], 8080, "{e}");
            assert_eq!(text(&e, "protocol"), "TCP", "{e}");
            assert_eq!(text(&e, "drop_reason"), "policy_denied_ingress", "{e}");
            assert_eq!(text(&e, "policy"), "default-deny", "{e}");
            assert!(["n0", "n1"].contains(&text(&e, "node")), "{e}");
            node = text(&e, "node").to_owned();
            delays.push(ms(t.saturating_duration_since(t0)));
        }
        let mut sorted = delays.clone();
        sorted.sort_by(f64::total_cmp);
        println!(
            "denied attempt -> event through the control plane (node {node}), {} attempts: p50 {:.1} ms, max {:.1} ms",
            sorted.len(),
            sorted[sorted.len() / 2],
            sorted[sorted.len() - 1]
        );
        drop(follower);

        // History, without --follow: the node's events, and none under the other node.
        let other = if node == "n0" { "n1" } else { "n0" };
        let hist = |n: &str| -> Result<Vec<serde_json::Value>> {
            s.ctl(&[
                "observe",
                "--verdict",
                "DROPPED",
                "--node",
                n,
                "--port",
                "8080",
                "-o",
                "json",
            ])?
            .lines()
            .map(|l| serde_json::from_str(l).map_err(|e| setup(format!("{e}: {l}"))))
            .collect()
        };
        let mine = hist(&node)?;
        assert!(
            (41000..41010).all(|p| mine.iter().any(|e| e["src_port"] == p)),
            "history of {node} lacks a measured attempt: {mine:?}"
        );
        assert!(mine.iter().all(|e| text(e, "node") == node));
        assert!(hist(other)?.iter().all(|e| text(e, "node") == other));
        let table = s.ctl(&["observe", "--verdict", "DROPPED", "--last", "3"])?;
        println!("{table}");
        assert!(table.contains("policy_denied_ingress"), "{table}");
        assert!(table.contains(&client_name), "{table}");

        // The control plane restarts (its history is gone): the agents reconnect by themselves
        // and new events flow through it again.
        s.server.kill();
        let t_restart = Instant::now();
        s.server.restart()?;
        let follower = Follower::start(&s, &["--verdict", "DROPPED", "--node", &node])?;
        let mut back = None;
        for k in 0..40u16 {
            let mut a = attempt(&cns, web_ip, 8080, 42000 + k)?;
            let seen = follower.wait_src_port(42000 + k, Duration::from_millis(500))?;
            let _ = a.wait();
            if let Some((t, e)) = seen {
                back = Some((t, e));
                break;
            }
        }
        let (t, e) = back.ok_or_else(|| setup("no event through the restarted control plane"))?;
        assert_eq!(text(&e, "drop_reason"), "policy_denied_ingress", "{e}");
        println!(
            "events through the restarted control plane again {:.1} ms after the restart began",
            ms(t.saturating_duration_since(t_restart))
        );
        Ok(())
    })());
}

/// A new TCP connection that reuses the 5-tuple of one closed moments ago meets the NetworkPolicy
/// of now, on one node and across nodes: from a fixed source port the client connects to two
/// `app: web` pods and closes; connecting again from that port still works (the port reuse is
/// real: the client's kernel reopens its TIME_WAIT tuple and sends a SYN); a default-deny ingress
/// policy is applied; the same connection from the same port is then denied, and `sluicectl
/// observe` shows that attempt's `policy_denied_ingress`.
#[test]
fn reused_five_tuple_meets_a_new_policy() {
    if !require_root() {
        return;
    }
    check((|| {
        let mut s = Setup::new()?;
        let client = s.c.add_pod_cni(0, &[("role", "client")])?;
        let targets = [
            ("same node", s.c.add_pod_cni(0, &[("app", "web")])?, 40000),
            (
                "across nodes",
                s.c.add_pod_cni(1, &[("app", "web")])?,
                40001,
            ),
        ];
        for &(_, p, _) in &targets {
            s.c.tcp_echo_server(p, 8080)?;
        }
        let cns = s.c.pods[client].ns.clone();
        // The client reuses a port its own TIME_WAIT still holds (timestamps on, 1 s passed), as
        // a busy Linux client with tcp_tw_reuse does.
        sluice_e2e::sh(&cns, "sysctl -qw net.ipv4.tcp_tw_reuse=1")?;
        until("every pod is reported", || {
            s.ctl(&["get", "pods", "-o", "json"]).is_ok_and(|j| {
                s.c.pods
                    .iter()
                    .all(|p| j.contains(&format!("\"{}\"", p.ip)))
            })
        })?;
        s.apply_synced("ns.yaml", NAMESPACE)?;
        let connect = |ip: Ipv4Addr, sport: u16, line: &str| {
            Cluster::tcp_lines_from(&cns, Some(sport), ip, 8080, &[line])
        };

        for round in ["first", "second"] {
            for &(what, p, sport) in &targets {
                let ip = s.c.pods[p].ip;
                let reply = connect(ip, sport, round)?;
                println!("{what}: {round} connection from port {sport} to {ip}: {reply:?}");
                assert_eq!(reply, vec![format!("{ip} {round}")], "{what}");
            }
            std::thread::sleep(Duration::from_millis(1100));
        }

        let (rev, d) = s.apply_synced("deny.yaml", DENY)?;
        println!(
            "default-deny ingress for app=web: revision {rev}, on both agents {:.1} ms after apply",
            ms(d)
        );
        std::thread::sleep(Duration::from_millis(1100));
        for &(what, p, sport) in &targets {
            let ip = s.c.pods[p].ip;
            let reply = connect(ip, sport, "third");
            println!("{what}: connection from port {sport} after the deny: {reply:?}");
            assert!(
                reply.as_ref().map_or(true, |r| r.is_empty()),
                "{what}: a connection reusing port {sport} passed the default deny: {reply:?}"
            );
            until("the reused port's denial is observed", || {
                s.ctl(&[
                    "observe",
                    "--verdict",
                    "DROPPED",
                    "--port",
                    "8080",
                    "-o",
                    "json",
                ])
                .is_ok_and(|out| {
                    out.lines()
                        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                        .any(|e| {
                            e["src_port"] == sport
                                && text(&e, "dst_ip") == ip.to_string()
                                && text(&e, "drop_reason") == "policy_denied_ingress"
                        })
                })
            })?;
        }
        let table = s.ctl(&["observe", "--verdict", "DROPPED", "--last", "4"])?;
        println!("{table}");
        for &(_, _, sport) in &targets {
            assert!(table.contains(&format!(":{sport} ")), "{table}");
        }
        Ok(())
    })());
}

/// A churn run where pods are deleted (CNI DEL) while their agent is SIGKILLed: once it is back,
/// nothing of them is left, not in the registry, the control plane, the XDP program's pinned maps
/// (`sluice_ifaces`, `sluice_xsk_slots`, `sluice_isolated`) nor its link pins; their addresses
/// are handed out again and work; the standby path learned node 1 from the control plane.
#[test]
fn pods_deleted_while_the_agent_is_down_leave_nothing_behind() {
    if !require_root() {
        return;
    }
    check((|| {
        let mut s = Setup::new()?;
        // app=web pods are isolated for ingress: their addresses sit in `sluice_isolated`.
        s.apply_synced("deny.yaml", DENY)?;
        let remote = s.c.add_pod_cni(1, &[("role", "client")])?;
        let ipam = s.c.nodes[0].dir.join("ipam/sluice");
        let mut live: Vec<usize> = Vec::new();
        let mut deleted: Vec<(Ipv4Addr, String)> = Vec::new();
        for round in 0..2 {
            for _ in 0..4 {
                live.push(s.c.add_pod_cni(0, &[("app", "web")])?);
            }
            until("every pod is reported", || {
                s.ctl(&["get", "pods", "-o", "json"]).is_ok_and(|j| {
                    live.iter()
                        .all(|p| j.contains(&format!("\"{}\"", s.c.pods[*p].ip)))
                })
            })?;
            let doomed: Vec<usize> = live.drain(..3).collect();
            let doomed_ifindexes: Vec<u32> = doomed
                .iter()
                .map(|p| s.c.host_ifindex(*p))
                .collect::<Result<_>>()?;

            s.c.stop_agent(0, nix::sys::signal::Signal::SIGKILL)?;
            for p in &doomed {
                s.c.del_pod_cni(*p)?;
                deleted.push((s.c.pods[*p].ip, s.c.pods[*p].container_id.clone()));
            }
            let stale = s.c.nodes[0].pinned_map("sluice_ifaces")?;
            s.c.start_agent(0)?;
            let live_n = live.len();
            s.c.wait_counters(0, |f| f.pods == live_n)?;

            // Registry and control plane.
            let registry = std::fs::read_to_string(s.c.nodes[0].state_dir().join("pods.json"))
                .map_err(setup)?;
            let registered = registry.matches("\"container_id\"").count();
            assert_eq!(registered, live.len(), "registry: {registry}");
            for (ip, id) in &deleted {
                assert!(!registry.contains(id.as_str()), "{id} still registered");
                assert!(
                    !registry.contains(&format!("\"{ip}\"")),
                    "{ip} still registered"
                );
            }
            let held = until("the deleted pods leave the control plane", || {
                s.ctl(&["get", "pods", "-o", "json"]).is_ok_and(|j| {
                    deleted
                        .iter()
                        .all(|(ip, _)| !j.contains(&format!("\"{ip}\"")))
                        && live
                            .iter()
                            .all(|p| j.contains(&format!("\"{}\"", s.c.pods[*p].ip)))
                })
            });
            held?;

            // The XDP program's pinned state: the uplink and the live pods, nothing else.
            let n = &s.c.nodes[0];
            let mut ours: Vec<u64> = live
                .iter()
                .map(|p| s.c.host_ifindex(*p).map(u64::from))
                .collect::<Result<_>>()?;
            ours.push(u64::from(n.ifindex("eth0")?));
            ours.sort_unstable();
            let keys = |v: &serde_json::Value, field: Option<&str>| -> Vec<u64> {
                let mut k: Vec<u64> = v
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|e| {
                                let k = &e["formatted"]["key"];
                                field.map_or(k.as_u64(), |f| k[f].as_u64())
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                k.sort_unstable();
                k.dedup();
                k
            };
            let ifaces = keys(&n.pinned_map("sluice_ifaces")?, None);
            println!(
                "round {round}: deleted while down {doomed_ifindexes:?}; sluice_ifaces before the restart {:?}, after {ifaces:?}",
                keys(&stale, None)
            );
            assert_eq!(ifaces, ours, "sluice_ifaces");
            let pins: Vec<u64> = n
                .link_pins()
                .iter()
                .filter_map(|p| p.parse().ok())
                .collect();
            let mut pins = pins;
            pins.sort_unstable();
            assert_eq!(pins, ours, "link pins");
            let punt = u64::from(n.ifindex("sluice-punt")?);
            let slot_ifs = keys(&n.pinned_map("sluice_xsk_slots")?, Some("ifindex"));
            let mut want = ours.clone();
            want.push(punt);
            want.sort_unstable();
            assert_eq!(slot_ifs, want, "sluice_xsk_slots");
            let mut isolated = keys(&n.pinned_map("sluice_isolated")?, None);
            isolated.sort_unstable();
            let mut live_ips: Vec<u64> = live
                .iter()
                .map(|p| u64::from(u32::from_ne_bytes(s.c.pods[*p].ip.octets())))
                .collect();
            live_ips.sort_unstable();
            assert_eq!(isolated, live_ips, "sluice_isolated");
            println!(
                "round {round}: after the restart {} live pods on node 0: registry {} entries, deleted pods in the control plane {}, sluice_ifaces {ifaces:?}, link pins {pins:?}, sluice_xsk_slots interfaces {slot_ifs:?}, sluice_isolated {} entries",
                live.len(),
                registered,
                deleted
                    .iter()
                    .filter(|(ip, _)| s
                        .ctl(&["get", "pods", "-o", "json"])
                        .is_ok_and(|j| j.contains(&format!("\"{ip}\""))))
                    .count(),
                isolated.len()
            );
        }

        // Deleted addresses are handed out again (IPAM's round robin pointed at them) and work.
        for (ip, _) in deleted.iter().take(2) {
            let before = Ipv4Addr::from(u32::from(*ip) - 1);
            std::fs::write(ipam.join("last"), before.to_string()).map_err(setup)?;
            let p = s.c.add_pod_cni(0, &[("role", "reuse")])?;
            assert_eq!(s.c.pods[p].ip, *ip, "IPAM did not reuse {ip}");
            s.c.ping(remote, *ip, 2)?;
        }
        println!(
            "addresses deleted while the agent was down and reused: {:?}",
            deleted.iter().take(2).map(|d| d.0).collect::<Vec<_>>()
        );

        // The standby path knows node 1 from the control plane.
        let routes = sluice_e2e::ip(Some(&s.c.nodes[0].ns), "route show dev sluice-vxlan")?;
        let routes = String::from_utf8_lossy(&routes.stdout).into_owned();
        println!("node 0 standby routes: {routes}");
        assert!(routes.contains("10.244.2.0/24 via 10.244.2.0"), "{routes}");
        Ok(())
    })());
}

/// A control-plane agent restarted while the control plane is down never serves tables without
/// its policies (found by the churn soak: a denied pair got through for the seconds between the
/// restart and the first revision). It serves the objects of the last revision it applied, kept
/// in its state directory (policies and peers: the denied pairs stay denied, the one on the
/// restarted node's own pods included, which only that node can deny, and the allowed cross-node
/// pair keeps working); without them, its pods stay isolated both ways until the control plane
/// answers, which then restores the allowed pair.
#[test]
fn agent_restarted_without_the_control_plane_keeps_its_policies() {
    if !require_root() {
        return;
    }
    check((|| {
        let mut s = Setup::new()?;
        let client = s.c.add_pod_cni(0, &[("role", "other")])?;
        let web = s.c.add_pod_cni(1, &[("app", "web")])?;
        // On the node that restarts: its policy decisions are that node's alone.
        let neighbour = s.c.add_pod_cni(1, &[("role", "other")])?;
        for p in [client, web] {
            s.c.tcp_echo_server(p, 8080)?;
        }
        let (cns, wns) = (s.c.pods[client].ns.clone(), s.c.pods[web].ns.clone());
        let nns = s.c.pods[neighbour].ns.clone();
        let (cip, wip) = (s.c.pods[client].ip, s.c.pods[web].ip);
        let nip = s.c.pods[neighbour].ip;
        until("every pod is reported", || {
            s.ctl(&["get", "pods", "-o", "json"]).is_ok_and(|j| {
                [cip, wip, nip]
                    .iter()
                    .all(|ip| j.contains(&format!("\"{ip}\"")))
            })
        })?;
        s.apply_synced("deny.yaml", DENY)?;
        // A denied connect times out (socat fails); an allowed one echoes.
        let passes = |from: &str, to: Ipv4Addr, what: &str| -> Result<bool> {
            let reply = Cluster::tcp_lines(from, to, 8080, &[what]);
            println!("  {what}: {reply:?}");
            Ok(reply.is_ok_and(|r| !r.is_empty()))
        };
        assert!(!passes(&cns, wip, "client -> web, synced")?);
        assert!(!passes(&nns, wip, "neighbour -> web, synced")?);
        assert!(passes(&wns, cip, "web -> client, synced")?);

        s.c.stop_agent(1, nix::sys::signal::Signal::SIGKILL)?;
        s.server.kill();
        s.c.start_agent(1)?;
        until("agent 1 serves its kept revision", || {
            s.c.agent_status(1)
                .is_ok_and(|(ready, note)| ready && note.contains("kept before the restart"))
        })?;
        println!(
            "agent 1 restarted without the control plane: {:?}",
            s.c.agent_status(1)?
        );
        for round in 0..3 {
            assert!(
                !passes(&nns, wip, &format!("neighbour -> web, restarted ({round})"))?,
                "the denied same-node pair got through after the restart"
            );
            assert!(
                !passes(&cns, wip, &format!("client -> web, restarted ({round})"))?,
                "the denied pair got through after the restart"
            );
        }
        assert!(passes(&wns, cip, "web -> client, restarted")?);

        s.c.stop_agent(1, nix::sys::signal::Signal::SIGKILL)?;
        let kept = s.c.nodes[1].state_dir().join("control-objects.json");
        std::fs::remove_file(&kept).map_err(setup)?;
        s.c.start_agent(1)?;
        until("agent 1 isolates its pods", || {
            s.c.agent_status(1)
                .is_ok_and(|(ready, note)| ready && note.contains("isolated"))
        })?;
        println!(
            "agent 1 restarted without its kept objects: {:?}",
            s.c.agent_status(1)?
        );
        assert!(!passes(&cns, wip, "client -> web, nothing kept")?);
        assert!(!passes(&nns, wip, "neighbour -> web, nothing kept")?);
        assert!(!passes(&wns, cip, "web -> client, nothing kept")?);

        s.server.restart()?;
        until("agent 1 notes it is synced", || {
            s.c.agent_status(1)
                .is_ok_and(|(ready, note)| ready && note.is_empty())
        })?;
        assert!(passes(&wns, cip, "web -> client, synced again")?);
        assert!(!passes(&cns, wip, "client -> web, synced again")?);
        assert!(kept.exists(), "the new revision is kept again");
        Ok(())
    })());
}
