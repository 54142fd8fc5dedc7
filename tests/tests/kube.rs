//! sluice-control following a Kubernetes API server (run as root): the mock API server
//! (`sluice_control::kube_mock`, speaking only the documented API over HTTP) serves on the underlay
//! switch at 192.168.77.254:6443; the real `sluice-control --kubeconfig` follows it (embedded redb
//! store, TLS, a bearer token per node); two netns nodes run real agents in control-plane mode;
//! pods are wired by the real `sluice-cni`. Every object the agents use comes from the mock: the
//! CNI's labels are deliberately different from the API's, and `sluicectl apply` is refused.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::json;
use sluice_agent::config::{ControlConfig, UNLEASED_POD_CIDR};
use sluice_control::client::{ClientConfig, ControlClient};
use sluice_control::kube_mock::{self, MockApi};
use sluice_e2e::{AgentOptions, Cluster, HarnessError, NodeKind, Result, in_ns, require_root, run};

const SERVER_IP: &str = "192.168.77.254";
const ENDPOINT: &str = "https://192.168.77.254:7443";
const API_ADDR: &str = "192.168.77.254:6443";
const OPERATOR_TOKEN: &str = "operator-token-0123456789abcdef";
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP2: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);

fn node_token(i: usize) -> String {
    format!("node-n{i}-token-0123456789abcdef")
}

fn setup(e: impl std::fmt::Display) -> HarnessError {
    HarnessError::Setup(e.to_string())
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

/// A CA, a server certificate for 192.168.77.254, the tokens file and the mock's kubeconfig.
fn make_files(dir: &Path, nodes: usize) -> Result<()> {
    let openssl = |args: &[&str]| {
        run(Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stderr(Stdio::piped()))
    };
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    let args = |s: &str| s.split(' ').map(str::to_owned).collect::<Vec<_>>();
    let v = args(&format!(
        "req -x509 {ec} -keyout ca.key -out ca.pem -days 2 -subj /CN=sluice-e2e-ca"
    ));
    openssl(&v.iter().map(String::as_str).collect::<Vec<_>>())?;
    let v = args(&format!(
        "req {ec} -keyout server.key -out server.csr -subj /CN=sluice-control"
    ));
    openssl(&v.iter().map(String::as_str).collect::<Vec<_>>())?;
    std::fs::write(
        dir.join("ext.cnf"),
        format!("subjectAltName=IP:{SERVER_IP},DNS:sluice-control\n"),
    )
    .map_err(setup)?;
    let v = args(
        "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile ext.cnf",
    );
    openssl(&v.iter().map(String::as_str).collect::<Vec<_>>())?;
    let mut tokens = format!("operator admin {OPERATOR_TOKEN}\n");
    for i in 0..nodes {
        tokens.push_str(&format!("node n{i} {}\n", node_token(i)));
        std::fs::write(dir.join(format!("n{i}.token")), node_token(i)).map_err(setup)?;
    }
    std::fs::write(dir.join("tokens"), tokens).map_err(setup)?;
    std::fs::write(
        dir.join("kubeconfig"),
        kube_mock::kubeconfig(&format!("http://{API_ADDR}")),
    )
    .map_err(setup)?;
    Ok(())
}

/// The mock API server, serving HTTP inside the switch namespace from its own thread.
fn serve_mock(ns: &str, api: &MockApi) -> Result<()> {
    let (tx, rx) = mpsc::channel::<std::result::Result<(), String>>();
    let ns = ns.to_owned();
    let api = api.clone();
    std::thread::spawn(move || {
        let r = (|| {
            let f =
                std::fs::File::open(format!("/var/run/netns/{ns}")).map_err(|e| e.to_string())?;
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| e.to_string())?;
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })();
        let rt = match r {
            Ok(rt) => rt,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        rt.block_on(async move {
            let addr: SocketAddr = API_ADDR.parse().expect("a socket address");
            match api.serve_http(addr).await {
                Ok(task) => {
                    let _ = tx.send(Ok(()));
                    let _ = task.await;
                }
                Err(e) => {
                    let _ = tx.send(Err(format!("binding {addr}: {e}")));
                }
            }
        });
    });
    rx.recv_timeout(Duration::from_secs(10))
        .map_err(setup)?
        .map_err(setup)
}

/// `sluice-control --kubeconfig` in the switch namespace; SIGKILLed on drop.
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
                "--kubeconfig",
                &d("kubeconfig"),
            ],
        )
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(setup)?)
        .stderr(log)
        .spawn()
        .map_err(|e| setup(format!("spawn sluice-control: {e}")))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while sluicectl(&self.ns, &self.dir, &["status"]).is_err() {
            if Instant::now() > deadline {
                return Err(setup(format!(
                    "sluice-control did not come up: {}",
                    self.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("control.log")).unwrap_or_default()
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

fn sluicectl_out(ns: &str, dir: &Path, args: &[&str]) -> Result<std::process::Output> {
    let bin = binary("SLUICECTL_BIN", "sluicectl")?;
    let mut argv = vec![bin.to_string_lossy().into_owned()];
    argv.extend(args.iter().map(|s| s.to_string()));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    in_ns(ns, &argv)
        .env("SLUICE_SERVER", ENDPOINT)
        .env("SLUICE_CA", dir.join("ca.pem"))
        .env("SLUICE_TOKEN", OPERATOR_TOKEN)
        .output()
        .map_err(setup)
}

/// `sluicectl args` in the switch namespace as the operator; stdout, or the failure.
fn sluicectl(ns: &str, dir: &Path, args: &[&str]) -> Result<String> {
    let out = sluicectl_out(ns, dir, args)?;
    if !out.status.success() {
        return Err(setup(format!(
            "sluicectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

type Ask = (u64, mpsc::Sender<std::result::Result<Instant, String>>);

/// Asks the control plane (from a thread inside the switch namespace) every 2 ms until its
/// store moved past a revision and every agent reported the store's revision as synced.
struct SyncWatcher {
    tx: mpsc::Sender<Ask>,
}

impl SyncWatcher {
    fn start(ns: &str, ca: Vec<u8>, nodes: usize) -> Self {
        let (tx, rx) = mpsc::channel::<Ask>();
        let ns = ns.to_owned();
        std::thread::spawn(move || {
            let Ok(f) = std::fs::File::open(format!("/var/run/netns/{ns}")) else {
                return;
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
                while let Ok((after, reply)) = rx.recv() {
                    let deadline = Instant::now() + Duration::from_secs(30);
                    let r = loop {
                        if client.is_none() {
                            client = ControlClient::connect(&cfg).await.ok();
                        }
                        if let Some(c) = &client {
                            match c.status().await {
                                Ok(s)
                                    if s.revision > after
                                        && (0..nodes).all(|i| {
                                            s.agents.iter().any(|a| {
                                                a.node == format!("n{i}")
                                                    && a.synced_revision >= s.revision
                                            })
                                        }) =>
                                {
                                    break Ok(Instant::now());
                                }
                                Ok(_) => {}
                                Err(_) => client = None,
                            }
                        }
                        if Instant::now() > deadline {
                            break Err(format!(
                                "the store never moved past revision {after} with every agent synced"
                            ));
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    };
                    let _ = reply.send(r);
                }
            });
        });
        Self { tx }
    }

    /// When the store first moved past `after` with every agent synced to it.
    fn synced_after(&self, after: u64) -> Result<Instant> {
        let (tx, rx) = mpsc::channel();
        self.tx.send((after, tx)).map_err(setup)?;
        rx.recv_timeout(Duration::from_secs(40))
            .map_err(setup)?
            .map_err(setup)
    }
}

fn obj<T: k8s_openapi::serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T> {
    serde_json::from_value(v).map_err(setup)
}

fn api_pod(name: &str, node: usize, ip: Ipv4Addr, labels: &[(&str, &str)]) -> Result<Pod> {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    obj(
        json!({"metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"nodeName": format!("n{node}"), "containers": [{"name": "c", "image": "x",
            "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]}}),
    )
}

fn api_service(name: &str, vip: Ipv4Addr) -> Result<Service> {
    obj(json!({"metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": vip.to_string(), "clusterIPs": [vip.to_string()],
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}))
}

fn api_slice(service: &str, backends: &[Ipv4Addr]) -> Result<EndpointSlice> {
    let eps: Vec<_> = backends
        .iter()
        .map(|ip| json!({"addresses": [ip.to_string()]}))
        .collect();
    obj(
        json!({"metadata": {"name": format!("{service}-1"), "namespace": "default",
            "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps}),
    )
}

fn deny_web() -> Result<NetworkPolicy> {
    obj(
        json!({"metadata": {"name": "web-deny", "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"]}}),
    )
}

fn allow_clients() -> Result<NetworkPolicy> {
    obj(
        json!({"metadata": {"name": "web-allow-clients", "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                "ports": [{"port": 8080, "protocol": "TCP"}]}]}}),
    )
}

fn noop_policy(i: usize) -> Result<NetworkPolicy> {
    obj(json!({"metadata": {"name": "noop", "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {"app": format!("none{i}")}},
            "policyTypes": ["Ingress"]}}))
}

/// `n` connections to `vip`:80 from namespace `ns`; backend -> connections served.
fn spread(ns: &str, vip: Ipv4Addr, n: usize) -> Result<BTreeMap<String, usize>> {
    let mut served = BTreeMap::new();
    for i in 0..n {
        let line = format!("c{i}");
        let reply = Cluster::tcp_lines(ns, vip, 80, &[&line])?;
        let (backend, echoed) = reply
            .first()
            .and_then(|r| r.split_once(' '))
            .ok_or_else(|| setup(format!("connection {i} to {vip} got {reply:?}")))?;
        assert_eq!(echoed, line);
        *served.entry(backend.to_owned()).or_default() += 1;
    }
    Ok(served)
}

fn connects(ns: &str, vip: Ipv4Addr) -> bool {
    Cluster::tcp_lines(ns, vip, 80, &["x"]).is_ok_and(|r| !r.is_empty())
}

/// Retry `f` until it holds (up to 20 s).
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

struct Setup {
    c: Cluster,
    api: MockApi,
    server: ControlServer,
    watcher: SyncWatcher,
    dir: PathBuf,
    /// API change -> every agent synced, in ms.
    delays: Vec<f64>,
}

impl Setup {
    fn ctl(&self, args: &[&str]) -> Result<String> {
        sluicectl(&self.c.switch, &self.dir, args)
    }

    fn revision(&self) -> Result<u64> {
        let st: serde_json::Value =
            serde_json::from_str(&self.ctl(&["status", "-o", "json"])?).map_err(setup)?;
        st["revision"]
            .as_u64()
            .ok_or_else(|| setup(format!("no revision in {st}")))
    }

    /// Make a change in the API server and wait until the store moved and both agents run it;
    /// records the delay.
    fn change(&mut self, what: &str, f: impl FnOnce(&MockApi)) -> Result<Duration> {
        let before = self.revision()?;
        let t = Instant::now();
        f(&self.api);
        let done = self.watcher.synced_after(before).map_err(|e| {
            setup(format!(
                "{what}: {e}\n{}",
                self.server
                    .log()
                    .lines()
                    .rev()
                    .take(30)
                    .collect::<Vec<_>>()
                    .join("\n")
            ))
        })?;
        let d = done.saturating_duration_since(t);
        self.delays.push(ms(d));
        println!(
            "{what}: on both agents {:.1} ms after the API change",
            ms(d)
        );
        Ok(d)
    }

    fn pods_json(&self) -> Result<String> {
        self.ctl(&["get", "pods", "-o", "json"])
    }
}

/// The whole issue's end-to-end list against the mock API server: a Service spreads over both
/// nodes, a NetworkPolicy denies, a label change on a pod in the API flips a decision, a deleted
/// object is gone from every agent, sluice-control restarted while the API changes resyncs with
/// nothing lost or left over, a `410 Gone` relists; the Nodes get Flannel's annotations and the
/// agents the cluster's pod CIDRs; p50/p99 of API change -> every agent synced printed.
#[test]
fn api_server_drives_two_nodes() {
    if !require_root() {
        return;
    }
    if let Err(e) = scenario() {
        panic!("{e}");
    }
}

fn scenario() -> Result<()> {
    let mut c = Cluster::new(&[NodeKind::Sluice; 2], AgentOptions::default())?;
    let dir = c.write_manifest("kube-marker", "")?.with_file_name("kube");
    std::fs::create_dir_all(&dir).map_err(setup)?;
    make_files(&dir, 2)?;
    sluice_e2e::ip(Some(&c.switch), &format!("addr add {SERVER_IP}/24 dev br0"))?;

    // The cluster as the API server has it before Sluice starts: the Nodes with the pod CIDRs
    // the cluster allocated (not what Sluice's own leases would give: .1 and .2).
    let api = MockApi::new();
    api.put(&obj::<Namespace>(
        json!({"metadata": {"name": "default", "labels": {"team": "e2e"}}}),
    )?);
    for (i, cidr) in ["10.244.11.0/24", "10.244.12.0/24"].iter().enumerate() {
        api.put(&obj::<Node>(json!({"metadata": {"name": format!("n{i}")},
            "spec": {"podCIDR": cidr, "podCIDRs": [cidr]}}))?);
    }
    serve_mock(&c.switch, &api)?;
    let server = ControlServer::start(&c.switch, &dir)?;

    // sluicectl apply is refused: the API server owns the objects.
    let p = c.write_manifest(
        "ns.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n",
    )?;
    let out = sluicectl_out(&c.switch, &dir, &["apply", "-f", &p.to_string_lossy()])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "apply was accepted while following");
    assert!(err.contains("Kubernetes API server"), "{err}");

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
    let mut s = Setup {
        c,
        api,
        server,
        watcher,
        dir,
        delays: Vec::new(),
    };

    // Registration took Node.spec.podCIDR; the Nodes got Flannel's annotations.
    let nodes = s.ctl(&["nodes"])?;
    println!("{nodes}");
    assert!(
        nodes.contains("10.244.11.0/24") && nodes.contains("10.244.12.0/24"),
        "{nodes}"
    );
    for i in 0..2 {
        let name = format!("n{i}");
        until(&format!("{name} carries Flannel's annotations"), || {
            s.api.get::<Node>(None, &name).is_some_and(|n| {
                let a = n.metadata.annotations.unwrap_or_default();
                let data = a
                    .get("flannel.alpha.coreos.com/backend-data")
                    .cloned()
                    .unwrap_or_default();
                let mac = s.c.nodes[i].vtep_mac.to_string().to_lowercase();
                a.get("flannel.alpha.coreos.com/public-ip")
                    == Some(&s.c.nodes[i].underlay_ip.to_string())
                    && a.get("flannel.alpha.coreos.com/backend-type")
                        .map(String::as_str)
                        == Some("vxlan")
                    && data.to_lowercase().contains(&mac)
            })
        })?;
    }
    println!(
        "n0 annotations: {:?}",
        s.api
            .get::<Node>(None, "n0")
            .and_then(|n| n.metadata.annotations)
    );

    // Pods wired by the CNI with labels the API does not have (runtimeConfig is not a source of
    // labels when following), then their Pod objects in the API server.
    let client = s.c.add_pod_cni(0, &[("app", "web")])?;
    let other = s.c.add_pod_cni(0, &[("role", "client")])?;
    let mut backends = Vec::new();
    let mut web_pods = Vec::new();
    for node in [0, 1, 1] {
        let p = s.c.add_pod_cni(node, &[])?;
        s.c.tcp_echo_server(p, 8080)?;
        backends.push(s.c.pods[p].ip);
        web_pods.push(p);
    }
    let pod_labels = |p: usize| -> Vec<(&'static str, &'static str)> {
        if p == client {
            vec![("role", "client")]
        } else if p == other {
            vec![("role", "other")]
        } else {
            vec![("app", "web")]
        }
    };
    let pods: Vec<(String, usize, Ipv4Addr)> =
        s.c.pods
            .iter()
            .map(|p| (p.container_id.clone(), p.node, p.ip))
            .collect();
    s.change("pods", |api| {
        for (k, (name, node, ip)) in pods.iter().enumerate() {
            if let Ok(p) = api_pod(name, *node, *ip, &pod_labels(k)) {
                api.put(&p);
            }
        }
    })?;
    until("every pod is stored with the API's labels", || {
        s.pods_json().is_ok_and(|j| {
            pods.iter()
                .all(|(_, _, ip)| j.contains(&format!("\"{ip}\"")))
        })
    })?;
    let cns = s.c.pods[client].ns.clone();
    let ons = s.c.pods[other].ns.clone();

    // A Service spreads over the backends of both nodes.
    let b = backends.clone();
    s.change("service + endpoint slice", |api| {
        if let (Ok(svc), Ok(slice)) = (api_service("web", VIP), api_slice("web", &b)) {
            api.put(&svc);
            api.put(&slice);
        }
    })?;
    until("the VIP answers", || connects(&cns, VIP))?;
    let served = spread(&cns, VIP, 24)?;
    println!("connections per backend: {served:?}");
    let want: BTreeSet<String> = backends.iter().map(|b| b.to_string()).collect();
    assert_eq!(served.keys().cloned().collect::<BTreeSet<_>>(), want);

    // A NetworkPolicy denies; allowing role=client lets the client (and not role=other) in.
    s.change("default deny for app=web", |api| {
        if let Ok(p) = deny_web() {
            api.put(&p);
        }
    })?;
    for _ in 0..6 {
        assert!(!connects(&cns, VIP), "a connection passed the default deny");
    }
    s.change("allow role=client", |api| {
        if let Ok(p) = allow_clients() {
            api.put(&p);
        }
    })?;
    until("the client connects", || connects(&cns, VIP))?;
    let served = spread(&cns, VIP, 24)?;
    assert_eq!(served.keys().cloned().collect::<BTreeSet<_>>(), want);
    assert!(!connects(&ons, VIP), "role=other passed the policy");

    // A label change on the other pod in the API flips the decision.
    let (oname, onode, oip) = pods[other].clone();
    s.change("relabel role=other -> role=client", |api| {
        if let Ok(p) = api_pod(&oname, onode, oip, &[("role", "client")]) {
            api.put(&p);
        }
    })?;
    until("the relabelled pod connects", || connects(&ons, VIP))?;
    let served = spread(&ons, VIP, 24)?;
    assert_eq!(served.keys().cloned().collect::<BTreeSet<_>>(), want);

    // A deleted object is gone from every agent: without the allow policy, nobody gets in to
    // the backends of either node.
    s.change("delete the allow policy", |api| {
        api.delete::<NetworkPolicy>(Some("default"), "web-allow-clients");
    })?;
    for _ in 0..6 {
        assert!(
            !connects(&cns, VIP),
            "the deleted allow policy still lets the client in"
        );
    }
    for &ip in &backends {
        assert!(
            Cluster::tcp_lines(&cns, ip, 8080, &["x"]).map_or(true, |r| r.is_empty()),
            "backend {ip} still admits the client"
        );
    }
    let netpols = s.ctl(&["get", "netpol", "-A", "-o", "json"])?;
    assert!(!netpols.contains("web-allow-clients"), "{netpols}");

    // Latency figures: more changes through the API server.
    for i in 0..15 {
        s.change(&format!("noop policy {i}"), |api| {
            if let Ok(p) = noop_policy(i) {
                api.put(&p);
            }
        })?;
    }

    // sluice-control killed; meanwhile the API server changes (the allow policy returns, the
    // Service is replaced by another, a backend pod is deleted) and compacts its history.
    // Restarted, it resyncs: nothing left over (the old Service), nothing lost (every pod, the
    // new objects).
    let rev_before_kill = s.revision()?;
    s.server.kill();
    let gone_pod = web_pods[2];
    let (gname, _, gip) = pods[gone_pod].clone();
    s.api.put(&allow_clients()?);
    s.api.delete::<Service>(Some("default"), "web");
    s.api.delete::<EndpointSlice>(Some("default"), "web-1");
    s.api.delete::<Pod>(Some("default"), &gname);
    s.api.put(&api_service("web2", VIP2)?);
    s.api.put(&api_slice("web2", &backends[..2])?);
    s.api.compact();
    let t_restart = Instant::now();
    s.server.restart()?;
    let synced = s.watcher.synced_after(rev_before_kill)?;
    until("the new Service answers", || connects(&cns, VIP2))?;
    let t_ok = Instant::now();
    println!(
        "restart: resync on both agents {:.1} ms, new Service answering {:.1} ms after the restart began",
        ms(synced.saturating_duration_since(t_restart)),
        ms(t_ok.saturating_duration_since(t_restart))
    );
    let served = spread(&cns, VIP2, 16)?;
    let want2: BTreeSet<String> = backends[..2].iter().map(|b| b.to_string()).collect();
    assert_eq!(served.keys().cloned().collect::<BTreeSet<_>>(), want2);
    until("the old Service is gone from both agents", || {
        !connects(&cns, VIP)
    })?;
    let svcs = s.ctl(&["get", "svc", "-A", "-o", "json"])?;
    assert!(!svcs.contains("\"web\""), "ghost Service: {svcs}");
    assert!(svcs.contains("\"web2\""), "{svcs}");
    let j = s.pods_json()?;
    for (_, _, ip) in &pods {
        assert!(j.contains(&format!("\"{ip}\"")), "pod {ip} lost: {j}");
    }
    // The deleted pod's sandbox is torn down (kubelet's CNI DEL): it leaves the control plane.
    s.c.del_pod_cni(gone_pod)?;
    until("the deleted pod leaves the control plane", || {
        s.pods_json()
            .is_ok_and(|j| !j.contains(&format!("\"{gip}\"")))
    })?;

    // 410 Gone on every open watch, and a change the watches cannot deliver: the relist does.
    let one = backends[0];
    s.change("410 Gone, then the slice shrinks to one backend", |api| {
        api.gone();
        if let Ok(sl) = api_slice("web2", &[one]) {
            api.put(&sl);
        }
    })?;
    let served = spread(&cns, VIP2, 8)?;
    assert_eq!(
        served.keys().cloned().collect::<Vec<_>>(),
        vec![one.to_string()]
    );
    let log = s.server.log();
    assert!(
        log.contains("410") || log.contains("too old resource version"),
        "no 410 in the control log"
    );

    let mut sorted = s.delays.clone();
    sorted.sort_by(f64::total_cmp);
    let pct = |q: f64| sorted[((sorted.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "API change -> both agents synced over {} changes: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        sorted.len(),
        pct(0.5),
        pct(0.99),
        sorted[sorted.len() - 1]
    );
    Ok(())
}

/// The ConfigMap of deploy/sluice.yaml: its data.
fn manifest_config() -> Result<BTreeMap<String, String>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/sluice.yaml");
    let text = std::fs::read_to_string(&path).map_err(setup)?;
    for doc in text.split("\n---\n") {
        let cm: serde_json::Value = serde_saphyr::from_str(doc).map_err(setup)?;
        if cm["kind"] == "ConfigMap" {
            let cm: k8s_openapi::api::core::v1::ConfigMap =
                serde_json::from_value(cm).map_err(setup)?;
            return Ok(cm.data.unwrap_or_default());
        }
    }
    Err(setup("no ConfigMap in deploy/sluice.yaml"))
}

/// The DaemonSet's init container for real (`sluice-control install-node`, paths under a
/// temporary directory): the plugin is installed executable, the conflist is the ConfigMap's,
/// and the rendered agent config loads as the agent's NodeConfig with this node's facts.
#[test]
fn install_node_renders_the_agent_config() {
    let bin = binary("SLUICE_CONTROL_BIN", "sluice-control").unwrap_or_else(|e| panic!("{e}"));
    let data = manifest_config().unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("10-sluice.conflist"), &data["10-sluice.conflist"]).unwrap();
    std::fs::write(d.join("agent.yaml"), &data["agent.yaml"]).unwrap();
    std::fs::write(d.join("plugin"), b"#!/bin/true\n").unwrap();
    std::fs::write(
        d.join("route"),
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
         ens3\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
         ens3\t0000000A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n",
    )
    .unwrap();
    let p = |f: &str| d.join(f).to_string_lossy().into_owned();
    let run_install = |env: &[(&str, &str)]| {
        Command::new(&bin)
            .args([
                "install-node",
                "--cni-plugin",
                &p("plugin"),
                "--cni-bin-dir",
                &p("bin"),
            ])
            .args([
                "--conflist",
                &p("10-sluice.conflist"),
                "--conflist-out",
                &p("net.d/10-sluice.conflist"),
            ])
            .args([
                "--agent-config",
                &p("agent.yaml"),
                "--agent-config-out",
                &p("run/agent.yaml"),
            ])
            .args(["--routes", &p("route")])
            .env_remove("UNDERLAY_INTERFACE")
            .env_remove("VTEP_MAC")
            .envs(env.iter().copied())
            .output()
            .unwrap()
    };
    let out = run_install(&[("NODE_NAME", "worker-3"), ("NODE_IP", "10.0.4.7")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{}", String::from_utf8_lossy(&out.stdout));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(d.join("bin/sluice-cni"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
    assert_eq!(
        std::fs::read_to_string(d.join("net.d/10-sluice.conflist")).unwrap(),
        data["10-sluice.conflist"]
    );
    let cfg = sluice_agent::config::NodeConfig::load(&d.join("run/agent.yaml"))
        .unwrap_or_else(|e| panic!("the rendered agent config does not load: {e}"));
    assert_eq!(cfg.node_name, "worker-3");
    assert_eq!(cfg.underlay.interface, "ens3");
    assert_eq!(cfg.underlay.address, Ipv4Addr::new(10, 0, 4, 7));
    assert_eq!(cfg.vtep.mac.to_string().to_lowercase(), "0e:53:0a:00:04:07");
    assert_eq!(cfg.pod_cidr, UNLEASED_POD_CIDR);
    let control = cfg.control.expect("a control section");
    assert_eq!(
        control.token_file.as_deref(),
        Some(Path::new("/etc/sluice/tokens/worker-3"))
    );

    // Without NODE_IP it says what is missing and writes nothing new.
    let out = run_install(&[("NODE_NAME", "worker-4")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("NODE_IP"));
}

/// The image FROM scratch (Containerfile, deploy/image.sh) builds with podman without pulling
/// anything, and every binary runs inside it with only the libraries staged: the control plane,
/// the CLI and the agent print their versions, the CNI plugin answers VERSION.
#[test]
fn image_from_scratch_builds_and_runs() {
    if !require_root() {
        return;
    }
    let bin_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/image.sh");
    let tag = "localhost/sluice:e2e";
    let t = Instant::now();
    let out = Command::new(&script)
        .arg(&bin_dir)
        .arg(tag)
        .output()
        .unwrap();
    let built = t.elapsed();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = String::from_utf8_lossy(&out.stdout);
    let files: Vec<&str> = listing
        .lines()
        .skip_while(|l| *l != "image files:")
        .skip(1)
        .take_while(|l| l.starts_with('/'))
        .collect();
    println!(
        "image built in {:.1} s; files: {files:?}",
        built.as_secs_f64()
    );
    assert!(
        files.contains(&"/usr/bin/sluice-agent") && files.contains(&"/lib64/ld-linux-x86-64.so.2")
    );
    let podman = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = Command::new("podman");
        // Lowered limits: this machine gives no CAP_SYS_RESOURCE to raise them.
        c.args(["run", "--rm", "--network", "none", "--pull", "never"]);
        c.args([
            "--ulimit",
            "nofile=4096:4096",
            "--ulimit",
            "nproc=4096:4096",
        ]);
        for (k, v) in env {
            c.args(["--env", &format!("{k}={v}")]);
        }
        c.args(["--entrypoint", args[0], tag]).args(&args[1..]);
        c.output().unwrap()
    };
    for b in ["sluice-control", "sluicectl", "sluice-agent"] {
        let out = podman(&[&format!("/usr/bin/{b}"), "--version"], &[]);
        assert!(
            out.status.success(),
            "{b} in the image: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains(b), "{b}");
    }
    let out = podman(&["/usr/bin/sluice-cni"], &[("CNI_COMMAND", "VERSION")]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("sluice-cni VERSION in the image: {e}: {out:?}"));
    assert!(v["supportedVersions"].is_array(), "{v}");
    let size = Command::new("podman")
        .args(["image", "inspect", "--format", "{{.Size}}", tag])
        .output()
        .unwrap();
    println!(
        "image size: {} bytes",
        String::from_utf8_lossy(&size.stdout).trim()
    );
    let _ = Command::new("podman").args(["rmi", "-f", tag]).output();
}
