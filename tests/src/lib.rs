//! A cluster in network namespaces, for Sluice's end-to-end tests (run as root).
//!
//! Layout (every namespace is named `sle-<pid>-<cluster>-...`, removed by [`Cluster`]'s `Drop` on
//! every path, panics included):
//! - `...-sw`: the underlay switch, a bridge `br0` with one port per node;
//! - `...-n<i>`: node `i` (0-based), uplink `eth0` at `192.168.77.<i+1>/24`, pod CIDR
//!   `10.244.<i+1>.0/24`, its own bpffs instance mounted at `<tmp>/n<i>/bpf` (outside `/sys`, so
//!   `ip netns exec` keeps it and pins survive an agent restart), and one `sluice-agent` process
//!   started inside its namespace, or, for a Flannel node, a kernel `flannel.1` VXLAN device
//!   programmed as DESIGN.md says;
//! - `...-n<i>p<j>`: pod `j` of node `i`, wired like the CNI does: veth `eth0` (tx checksum offload
//!   on, MTU [`POD_MTU`]) to host veth `vp<j>`, address `10.244.<i+1>.<j+2>/32`, default route via
//!   `169.254.1.1` onlink with a permanent neighbor entry to the host veth's MAC, per-route MTUs
//!   (on a Sluice node every cluster route large: the cluster CIDR, the service CIDR; the default
//!   route at the underlay MTU minus 50; a Flannel node's pods keep the overlay MTU beyond their
//!   own CIDR), and a host `/32` route.
//!   A Sluice pod is then announced to the agent with AddPod on its unix socket.
//!
//! The harness shells out to `ip`, `ethtool`, `bridge`; product code never does.

pub mod manifests;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use sluice_agent::config::{Mac, NodeConfig, PeerNode};
use sluice_agent::counters::CountersFile;
use sluice_control::agent_api::{AddPodRequest, DelPodRequest, StatusRequest};

/// A NetworkPolicy isolating pods labelled `app: db` in `default` for ingress, allowing nothing.
pub const DENY_DB_INGRESS: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-db, namespace: default}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress]
"#;

/// MTU of pod veths (DESIGN: large, so same-node TCP is not cut to MTU-sized frames; frames span
/// several UMEM chunks). Override with `SLUICE_E2E_POD_MTU`.
pub const POD_MTU: u32 = 65535;
/// The kernel caps route MTUs at 65520.
const MAX_ROUTE_MTU: u32 = 65520;

/// The pod MTU this run uses.
pub fn pod_mtu() -> u32 {
    std::env::var("SLUICE_E2E_POD_MTU")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(POD_MTU)
}
/// Underlay MTU.
pub const UNDERLAY_MTU: u32 = 1500;

/// The underlay MTU this run uses (`SLUICE_E2E_UNDERLAY_MTU`, e.g. 9000, else [`UNDERLAY_MTU`]).
pub fn underlay_mtu() -> u32 {
    std::env::var("SLUICE_E2E_UNDERLAY_MTU")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(UNDERLAY_MTU)
}

/// A harness step failed; the message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("{0}")]
    Setup(String),
}

pub type Result<T, E = HarnessError> = std::result::Result<T, E>;

/// Fail the test with the reason unless SLUICE_ALLOW_SKIP=1 (then print it and return false).
pub fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let why = "end-to-end tests need root (network namespaces, XDP, AF_XDP)";
    if std::env::var("SLUICE_ALLOW_SKIP").as_deref() == Ok("1") {
        eprintln!("skipped: {why}");
        return false;
    }
    panic!("{why}; run as root or set SLUICE_ALLOW_SKIP=1");
}

/// Run a command, failing with its stderr.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .output()
        .map_err(|e| HarnessError::Setup(format!("cannot run {cmd:?}: {e}")))?;
    if !out.status.success() {
        return Err(HarnessError::Command {
            cmd: format!("{cmd:?}"),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out)
}

/// `ip <args>` (in namespace `ns` when given).
pub fn ip(ns: Option<&str>, args: &str) -> Result<Output> {
    let mut c = Command::new("ip");
    if let Some(ns) = ns {
        c.args(["-n", ns]);
    }
    c.args(args.split_whitespace());
    run(&mut c)
}

/// A command line run inside namespace `ns` through `ip netns exec`.
pub fn in_ns(ns: &str, argv: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).args(argv);
    c
}

/// Run `sh -c script` inside `ns`.
pub fn sh(ns: &str, script: &str) -> Result<Output> {
    run(&mut in_ns(ns, &["sh", "-c", script]))
}

fn mac_of(ns: &str, ifname: &str) -> Result<Mac> {
    let out = sh(ns, &format!("cat /sys/class/net/{ifname}/address"))?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|e| HarnessError::Setup(format!("{e}")))
}

fn ifindex_of(ns: &str, ifname: &str) -> Result<u32> {
    let out = sh(ns, &format!("cat /sys/class/net/{ifname}/ifindex"))?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|e| HarnessError::Setup(format!("ifindex of {ifname}: {e}")))
}

/// Where the agent binary is: `$SLUICE_AGENT_BIN`, else `<workspace>/target/debug/sluice-agent`.
pub fn agent_binary() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("SLUICE_AGENT_BIN") {
        return Ok(p.into());
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/sluice-agent");
    if p.exists() {
        Ok(p)
    } else {
        Err(HarnessError::Setup(format!(
            "sluice-agent not built at {}: run `cargo build -p sluice-agent --bin sluice-agent` or set SLUICE_AGENT_BIN",
            p.display()
        )))
    }
}

/// Where the CNI plugin is: `$SLUICE_CNI_BIN`, else `<workspace>/target/debug/sluice-cni`.
pub fn cni_binary() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("SLUICE_CNI_BIN") {
        return Ok(p.into());
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/sluice-cni");
    if p.exists() {
        Ok(p)
    } else {
        Err(HarnessError::Setup(format!(
            "sluice-cni not built at {}: run `cargo build -p sluice-cni` or set SLUICE_CNI_BIN",
            p.display()
        )))
    }
}

/// What kind of node to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// A node running `sluice-agent`.
    Sluice,
    /// A node programmed like kernel Flannel (`flannel.1`, VNI 1, port 8472), no agent.
    Flannel,
}

/// How to start agents.
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// Run without the datapath (`--no-datapath`): control-path tests only.
    pub no_datapath: bool,
    /// Uplink rx/tx queues (veth `numrxqueues`/`numtxqueues`).
    pub uplink_queues: u32,
    /// Pod veth queues; 0: as many as the uplink (every worker then has a socket on each pod's
    /// veth). 1 with a multi-queue uplink: each pod's socket belongs to one worker.
    pub pod_queues: u32,
    /// Underlay MTU of this cluster (`None`: [`underlay_mtu`]).
    pub underlay_mtu: Option<u32>,
}

/// One node of the cluster.
#[derive(Debug)]
pub struct Node {
    pub index: usize,
    pub kind: NodeKind,
    pub ns: String,
    pub underlay_ip: Ipv4Addr,
    pub underlay_mac: Mac,
    pub pod_cidr: String,
    pub vtep_mac: Mac,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub agent: Option<Child>,
    pods: u32,
}

impl Node {
    pub fn socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }
    /// This node's bpffs mount point.
    pub fn bpffs(&self) -> PathBuf {
        self.dir.join("bpf")
    }
    /// The node's pinned XDP links (`<bpffs>/sluice/<node>/links/*`), sorted.
    pub fn link_pins(&self) -> Vec<String> {
        let dir = self.bpffs().join(format!("sluice/n{}/links", self.index));
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
    /// Whether anything of this node is still pinned.
    pub fn pin_dir_exists(&self) -> bool {
        self.bpffs()
            .join(format!("sluice/n{}", self.index))
            .exists()
    }
    /// The id of the XDP program attached to `ifname` in this node, if any.
    pub fn xdp_prog_id(&self, ifname: &str) -> Result<Option<u64>> {
        let out = ip(Some(&self.ns), &format!("-j link show dev {ifname}"))?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| HarnessError::Setup(format!("ip -j: {e}")))?;
        Ok(v[0]["xdp"]["prog"]["id"].as_u64())
    }
    pub fn vtep_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.index as u8 + 1, 0)
    }

    /// `bpftool -j map dump pinned` of this node's pinned map `name` (e.g. `sluice_xsk_slots`),
    /// parsed; readable while the agent is dead.
    pub fn pinned_map(&self, name: &str) -> Result<serde_json::Value> {
        let path = self
            .bpffs()
            .join(format!("sluice/n{}/maps/{name}", self.index));
        let out = run(Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(&path))?;
        serde_json::from_slice(&out.stdout)
            .map_err(|e| HarnessError::Setup(format!("bpftool dump of {name}: {e}")))
    }

    /// The ifindex of `ifname` in this node's namespace.
    pub fn ifindex(&self, ifname: &str) -> Result<u32> {
        ifindex_of(&self.ns, ifname)
    }

    /// The agent's counters file (rewritten every second).
    pub fn counters(&self) -> Result<CountersFile> {
        let p = self.state_dir().join("counters.json");
        let bytes = std::fs::read(&p)
            .map_err(|e| HarnessError::Setup(format!("cannot read {}: {e}", p.display())))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| HarnessError::Setup(format!("bad counters file: {e}")))
    }
}

/// A pod.
#[derive(Debug, Clone)]
pub struct Pod {
    pub node: usize,
    pub ns: String,
    pub ip: Ipv4Addr,
    pub host_ifname: String,
    pub container_id: String,
}

/// A TCP connection held open by `socat` inside a namespace: send a line, read the reply line.
#[derive(Debug)]
pub struct TcpSession {
    child: Child,
    stdin: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
}

impl TcpSession {
    /// Connect from namespace `ns` to `addr:port`.
    pub fn open(ns: &str, addr: Ipv4Addr, port: u16) -> Result<Self> {
        use std::io::BufRead;
        let target = format!("TCP:{addr}:{port},connect-timeout=3");
        let mut child = in_ns(ns, &["socat", "-", &target])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| HarnessError::Setup(format!("socat: {e}")))?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| HarnessError::Setup("no stdin".into()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| HarnessError::Setup("no stdout".into()))?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            stdin,
            lines,
        })
    }

    /// Send one line and wait (up to 5 s) for one reply line.
    pub fn exchange(&mut self, line: &str) -> Result<String> {
        use std::io::Write;
        writeln!(self.stdin, "{line}")
            .and_then(|()| self.stdin.flush())
            .map_err(|e| HarnessError::Setup(format!("session write: {e}")))?;
        self.lines
            .recv_timeout(Duration::from_secs(5))
            .map_err(|_| HarnessError::Setup(format!("no reply to {line:?}")))
    }
}

impl Drop for TcpSession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The whole cluster; dropping it stops the agents and removes every namespace it made.
#[derive(Debug)]
pub struct Cluster {
    pub prefix: String,
    pub switch: String,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    namespaces: Vec<String>,
    mounts: Vec<PathBuf>,
    procs: Vec<Child>,
    options: AgentOptions,
    _dir: tempfile::TempDir,
    runtime: tokio::runtime::Runtime,
}

static CLUSTERS: AtomicU32 = AtomicU32::new(0);

impl Cluster {
    /// Build the underlay and the nodes (agents not started yet: see [`Cluster::start_agents`]).
    /// The underlay MTU of this cluster.
    pub fn underlay_mtu(&self) -> u32 {
        self.options.underlay_mtu.unwrap_or_else(underlay_mtu)
    }

    pub fn new(kinds: &[NodeKind], options: AgentOptions) -> Result<Self> {
        let n = CLUSTERS.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("sle-{}-{n}", std::process::id());
        let dir = tempfile::Builder::new()
            .prefix(&format!("{prefix}-"))
            .tempdir()
            .map_err(|e| HarnessError::Setup(format!("tempdir: {e}")))?;
        // Multi-thread so the clients' connection tasks keep running between calls and close
        // when dropped.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| HarnessError::Setup(format!("tokio: {e}")))?;
        let mut c = Self {
            switch: format!("{prefix}-sw"),
            prefix,
            nodes: Vec::new(),
            pods: Vec::new(),
            namespaces: Vec::new(),
            mounts: Vec::new(),
            procs: Vec::new(),
            options,
            _dir: dir,
            runtime,
        };
        c.add_ns(&c.switch.clone())?;
        let sw = c.switch.clone();
        ip(Some(&sw), "link add br0 type bridge")?;
        ip(Some(&sw), "link set br0 up")?;
        for (i, kind) in kinds.iter().enumerate() {
            c.add_node(i, *kind)?;
        }
        Ok(c)
    }

    fn add_ns(&mut self, name: &str) -> Result<()> {
        ip(None, &format!("netns add {name}"))?;
        self.namespaces.push(name.to_owned());
        ip(Some(name), "link set lo up")?;
        Ok(())
    }

    fn add_node(&mut self, i: usize, kind: NodeKind) -> Result<()> {
        let ns = format!("{}-n{i}", self.prefix);
        self.add_ns(&ns)?;
        let octet = i as u8 + 1;
        let underlay_ip = Ipv4Addr::new(192, 168, 77, octet);
        let underlay_mac = Mac([0x0e, 0x5c, 0x01, 0, 0, octet]);
        let vtep_mac = Mac([0x0e, 0x5c, 0x02, 0, 0, octet]);
        let q = self.options.uplink_queues.max(1);
        ip(
            Some(&ns),
            &format!(
                "link add eth0 numtxqueues {q} numrxqueues {q} address {underlay_mac} type veth peer name n{i} numtxqueues {q} numrxqueues {q} netns {}",
                self.switch
            ),
        )?;
        ip(Some(&self.switch), &format!("link set n{i} master br0 up"))?;
        ip(
            Some(&ns),
            &format!("link set eth0 mtu {} up", self.underlay_mtu()),
        )?;
        ip(
            Some(&self.switch),
            &format!("link set n{i} mtu {}", self.underlay_mtu()),
        )?;
        ip(Some(&ns), &format!("addr add {underlay_ip}/24 dev eth0"))?;
        sh(&ns, "sysctl -qw net.ipv4.ip_forward=1")?;
        let dir = self._dir.path().join(format!("n{i}"));
        std::fs::create_dir_all(dir.join("state"))
            .and_then(|()| std::fs::create_dir_all(dir.join("bpf")))
            .map_err(|e| HarnessError::Setup(format!("mkdir: {e}")))?;
        let bpffs = dir.join("bpf");
        run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&bpffs))?;
        self.mounts.push(bpffs);
        self.nodes.push(Node {
            index: i,
            kind,
            config_path: dir.join("node.json"),
            dir,
            ns,
            underlay_ip,
            underlay_mac,
            pod_cidr: format!("10.244.{octet}.0/24"),
            vtep_mac,
            agent: None,
            pods: 0,
        });
        Ok(())
    }

    fn peers_of(&self, i: usize) -> Vec<PeerNode> {
        self.nodes
            .iter()
            .filter(|n| n.index != i)
            .map(|n| PeerNode {
                name: format!("n{}", n.index),
                underlay_ip: n.underlay_ip,
                underlay_mac: n.underlay_mac,
                pod_cidr: n.pod_cidr.parse().expect("harness CIDR"),
                vtep_mac: n.vtep_mac,
            })
            .collect()
    }

    /// The node config the harness writes for node `i` (manifests added by the caller).
    pub fn node_config(&self, i: usize) -> NodeConfig {
        let n = &self.nodes[i];
        let json = serde_json::json!({
            "node_name": format!("n{i}"),
            "underlay": {"interface": "eth0", "address": n.underlay_ip, "mtu": self.underlay_mtu(), "mac": n.underlay_mac},
            "pod_cidr": n.pod_cidr,
            "pod_mtu": pod_mtu(),
            "vtep": {"mac": n.vtep_mac},
            "peers": self.peers_of(i),
            "workers": {"pin": false},
            "paths": {"socket": n.socket(), "state_dir": n.state_dir(), "bpffs": n.bpffs()},
        });
        serde_json::from_value(json).expect("harness config is valid")
    }

    /// Program the Flannel nodes and start an agent on every Sluice node (configs written with
    /// `edit` applied), waiting until each agent's socket answers.
    pub fn start_agents(&mut self, edit: impl Fn(usize, &mut NodeConfig)) -> Result<()> {
        for i in 0..self.nodes.len() {
            match self.nodes[i].kind {
                NodeKind::Flannel => self.program_flannel(i)?,
                NodeKind::Sluice => {
                    let mut config = self.node_config(i);
                    edit(i, &mut config);
                    self.write_config(i, &config)?;
                    self.start_agent(i)?;
                }
            }
        }
        Ok(())
    }

    /// Write node `i`'s agent config (read when its agent next starts).
    pub fn write_config(&self, i: usize, config: &NodeConfig) -> Result<()> {
        let json = serde_json::to_vec_pretty(config).expect("config serializes");
        std::fs::write(&self.nodes[i].config_path, json)
            .map_err(|e| HarnessError::Setup(format!("write config: {e}")))
    }

    /// Start (or restart) the agent of node `i`.
    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        let bin = agent_binary()?;
        let node = &self.nodes[i];
        let log = std::fs::File::create(node.dir.join("agent.log"))
            .map_err(|e| HarnessError::Setup(format!("log: {e}")))?;
        let bin = bin.to_string_lossy().into_owned();
        let config = node.config_path.to_string_lossy().into_owned();
        let mut argv = vec![bin.as_str(), "--config", config.as_str()];
        if self.options.no_datapath {
            argv.push("--no-datapath");
        }
        let child = in_ns(&node.ns, &argv)
            .stdin(Stdio::null())
            .stdout(
                log.try_clone()
                    .map_err(|e| HarnessError::Setup(e.to_string()))?,
            )
            .stderr(log)
            .spawn()
            .map_err(|e| HarnessError::Setup(format!("spawn agent: {e}")))?;
        self.nodes[i].agent = Some(child);
        self.wait_socket(i)
    }

    fn wait_socket(&mut self, i: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let socket = self.nodes[i].socket();
        loop {
            if let Some(child) = self.nodes[i].agent.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(HarnessError::Setup(format!(
                    "agent of node {i} exited ({status}): {}",
                    self.agent_log(i)
                )));
            }
            if socket.exists() {
                let ok = self.runtime.block_on(async {
                    match sluice_control::agent_client::connect(&socket).await {
                        Ok(mut c) => c.status(StatusRequest {}).await.is_ok(),
                        Err(_) => false,
                    }
                });
                if ok {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Setup(format!(
                    "agent of node {i} did not answer on {}: {}",
                    socket.display(),
                    self.agent_log(i)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait (up to 10 s, re-reading the file the agent rewrites every second) until node `i`'s
    /// counters satisfy `pred`; fails with the last counters read.
    pub fn wait_counters(
        &self,
        i: usize,
        pred: impl Fn(&CountersFile) -> bool,
    ) -> Result<CountersFile> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let c = self.nodes[i].counters();
            if let Ok(c) = &c
                && pred(c)
            {
                return Ok(c.clone());
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Setup(format!(
                    "counters of node {i} never matched: {c:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Write a manifest file (YAML) into the cluster's directory; returns its path.
    pub fn write_manifest(&self, name: &str, yaml: &str) -> Result<PathBuf> {
        let p = self._dir.path().join(name);
        std::fs::write(&p, yaml).map_err(|e| HarnessError::Setup(format!("write {name}: {e}")))?;
        Ok(p)
    }

    /// Send SIGHUP to node `i`'s agent (re-read manifests) and wait until it published new tables.
    pub fn reload(&self, i: usize) -> Result<()> {
        let before = self.nodes[i].counters()?.generation;
        let pid = self.nodes[i]
            .agent
            .as_ref()
            .map(|c| nix::unistd::Pid::from_raw(c.id() as i32))
            .ok_or_else(|| HarnessError::Setup(format!("node {i} runs no agent")))?;
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP)
            .map_err(|e| HarnessError::Setup(format!("SIGHUP: {e}")))?;
        self.wait_counters(i, |c| c.generation > before).map(|_| ())
    }

    /// Start a long-running process inside namespace `ns`; it is killed when the cluster drops.
    pub fn spawn_in(&mut self, ns: &str, argv: &[&str]) -> Result<()> {
        let child = in_ns(ns, argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| HarnessError::Setup(format!("spawn {argv:?}: {e}")))?;
        self.procs.push(child);
        Ok(())
    }

    /// Run a TCP server in pod `p` on `port` answering every line it reads with
    /// `"<pod ip> <line>"` (so a client sees which backend served it).
    pub fn tcp_echo_server(&mut self, p: usize, port: u16) -> Result<()> {
        let ns = self.pods[p].ns.clone();
        let reply = format!("SYSTEM:while read l; do echo {} $l; done", self.pods[p].ip);
        self.tcp_server(&ns, port, &reply)
    }

    /// Run a TCP server in namespace `ns` on `port` answering each connection with the source
    /// address it came from (what NAT on the way made of it).
    pub fn tcp_peer_server(&mut self, ns: &str, port: u16) -> Result<()> {
        self.tcp_server(ns, port, "SYSTEM:echo $SOCAT_PEERADDR")
    }

    /// Run socat on `port` in `ns` with `reply` as the address of each connection; returns once
    /// it listens.
    fn tcp_server(&mut self, ns: &str, port: u16, reply: &str) -> Result<()> {
        let listen = format!("TCP-LISTEN:{port},fork,reuseaddr");
        self.spawn_in(ns, &["socat", &listen, reply])?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !String::from_utf8_lossy(&sh(ns, "ss -ltn").map(|o| o.stdout).unwrap_or_default())
            .contains(&format!(":{port} "))
        {
            if Instant::now() > deadline {
                return Err(HarnessError::Setup(format!(
                    "TCP server in {ns} not listening on {port}"
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// One TCP connection from namespace `ns` to `addr:port` sending `lines`; returns the reply
    /// lines.
    pub fn tcp_lines(ns: &str, addr: Ipv4Addr, port: u16, lines: &[&str]) -> Result<Vec<String>> {
        Self::tcp_lines_from(ns, None, addr, port, lines)
    }

    /// [`Self::tcp_lines`] from a chosen source port (bound with `SO_REUSEADDR`, as a client
    /// reusing its port does).
    pub fn tcp_lines_from(
        ns: &str,
        source_port: Option<u16>,
        addr: Ipv4Addr,
        port: u16,
        lines: &[&str],
    ) -> Result<Vec<String>> {
        let input: String = lines.iter().map(|l| format!("{l}\n")).collect();
        let bind = source_port.map_or(String::new(), |p| format!(",sourceport={p},reuseaddr"));
        let out = sh(
            ns,
            &format!(
                "printf '{input}' | socat -t 1 -T 3 - TCP:{addr}:{port},connect-timeout=3{bind}"
            ),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect())
    }

    /// The agent's log so far.
    pub fn agent_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.nodes[i].dir.join("agent.log")).unwrap_or_default()
    }

    /// The agent's Status (ready, message).
    pub fn agent_status(&self, i: usize) -> Result<(bool, String)> {
        let socket = self.nodes[i].socket();
        self.runtime.block_on(async {
            let mut c = sluice_control::agent_client::connect(&socket)
                .await
                .map_err(|e| HarnessError::Setup(e.to_string()))?;
            let r = c
                .status(StatusRequest {})
                .await
                .map_err(|e| HarnessError::Setup(e.to_string()))?
                .into_inner();
            Ok((r.ready, r.message))
        })
    }

    /// Send `signal` to the agent of node `i` and wait for it to exit.
    pub fn stop_agent(&mut self, i: usize, signal: nix::sys::signal::Signal) -> Result<()> {
        if let Some(mut child) = self.nodes[i].agent.take() {
            // The child is `ip netns exec <ns> sluice-agent`, which execs: its pid is the agent's.
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, signal);
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(HarnessError::Setup(format!(
                        "agent of node {i} did not exit after {signal}"
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// DESIGN's kernel Flannel node: `flannel.1` and, per peer, route + neighbor + fdb entry.
    fn program_flannel(&mut self, i: usize) -> Result<()> {
        let n = &self.nodes[i];
        let ns = n.ns.clone();
        ip(
            Some(&ns),
            &format!(
                "link add flannel.1 address {} type vxlan id 1 local {} dev eth0 dstport 8472 nolearning noudpcsum",
                n.vtep_mac, n.underlay_ip
            ),
        )?;
        ip(
            Some(&ns),
            &format!("link set flannel.1 mtu {} up", self.underlay_mtu() - 50),
        )?;
        ip(
            Some(&ns),
            &format!("addr add {}/32 dev flannel.1", n.vtep_ip()),
        )?;
        let peers: Vec<(String, Ipv4Addr, Mac, Ipv4Addr)> = self
            .nodes
            .iter()
            .filter(|p| p.index != i)
            .map(|p| (p.pod_cidr.clone(), p.vtep_ip(), p.vtep_mac, p.underlay_ip))
            .collect();
        for (cidr, vtep, mac, underlay) in peers {
            ip(
                Some(&ns),
                &format!("route add {cidr} via {vtep} dev flannel.1 onlink"),
            )?;
            ip(
                Some(&ns),
                &format!("neigh add {vtep} lladdr {mac} dev flannel.1 nud permanent"),
            )?;
            run(Command::new("bridge").args([
                "-n",
                &ns,
                "fdb",
                "append",
                &mac.to_string(),
                "dev",
                "flannel.1",
                "dst",
                &underlay.to_string(),
            ]))?;
        }
        Ok(())
    }

    /// Create a pod on node `i` wired like the CNI does, and announce it to the node's agent
    /// (Sluice nodes). Returns its index in `self.pods`.
    pub fn add_pod(&mut self, i: usize, labels: &[(&str, &str)]) -> Result<usize> {
        let j = self.nodes[i].pods;
        self.nodes[i].pods += 1;
        let node_ns = self.nodes[i].ns.clone();
        let ns = format!("{node_ns}p{j}");
        self.add_ns(&ns)?;
        let octet = i as u8 + 1;
        let pod_ip = Ipv4Addr::new(10, 244, octet, j as u8 + 2);
        let host_if = format!("vp{j}");
        let pod_mtu = pod_mtu();
        // By default as many queues as the uplink, so that every worker owns a socket on the
        // pod's veth.
        let q = match self.options.pod_queues {
            0 => self.options.uplink_queues.max(1),
            q => q,
        };
        ip(
            Some(&node_ns),
            &format!(
                "link add {host_if} mtu {pod_mtu} numtxqueues {q} numrxqueues {q} type veth peer name eth0 numtxqueues {q} numrxqueues {q} netns {ns}"
            ),
        )?;
        ip(Some(&node_ns), &format!("link set {host_if} up"))?;
        ip(Some(&ns), &format!("link set eth0 mtu {pod_mtu} up"))?;
        ip(Some(&ns), &format!("addr add {pod_ip}/32 dev eth0"))?;
        let host_mac = mac_of(&node_ns, &host_if)?;
        let pod_mac = mac_of(&ns, "eth0")?;
        let overlay_mtu = self.underlay_mtu() - 50;
        ip(Some(&ns), "route add 169.254.1.1 dev eth0 scope link")?;
        ip(
            Some(&ns),
            &format!("neigh add 169.254.1.1 lladdr {host_mac} dev eth0 nud permanent"),
        )?;
        ip(
            Some(&ns),
            &format!("route add default via 169.254.1.1 dev eth0 onlink mtu {overlay_mtu}"),
        )?;
        // A Sluice node's pods see the large MTU on every cluster route (all nodes' pods, the
        // Services: the dataplane segments for the underlay); a kernel Flannel node's pods keep
        // the overlay's MTU beyond their own node.
        let mut large = vec![format!("10.244.{octet}.0/24")];
        if self.nodes[i].kind == NodeKind::Sluice {
            large.extend(["10.244.0.0/16".to_owned(), "10.96.0.0/12".to_owned()]);
        }
        for cidr in large {
            ip(
                Some(&ns),
                &format!(
                    "route add {cidr} via 169.254.1.1 dev eth0 onlink mtu {}",
                    pod_mtu.min(MAX_ROUTE_MTU)
                ),
            )?;
        }
        ip(
            Some(&node_ns),
            &format!("route add {pod_ip}/32 dev {host_if} scope link"),
        )?;
        let container_id = format!("{}-n{i}p{j}", self.prefix);
        if self.nodes[i].kind == NodeKind::Sluice {
            let host_ifindex = ifindex_of(&node_ns, &host_if)?;
            let req = AddPodRequest {
                container_id: container_id.clone(),
                netns: format!("/var/run/netns/{ns}"),
                ifname: "eth0".into(),
                host_ifname: host_if.clone(),
                host_ifindex,
                ip: pod_ip.to_string(),
                pod_mac: pod_mac.0.to_vec(),
                host_mac: host_mac.0.to_vec(),
                namespace: "default".into(),
                name: format!("n{i}p{j}"),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ports: vec![],
            };
            let socket = self.nodes[i].socket();
            self.runtime.block_on(async {
                let mut c = sluice_control::agent_client::connect(&socket)
                    .await
                    .map_err(|e| HarnessError::Setup(e.to_string()))?;
                c.add_pod(req).await.map_err(|s| {
                    HarnessError::Setup(format!(
                        "AddPod for pod {pod_ip} on node {i} failed: {:?}: {}",
                        s.code(),
                        s.message()
                    ))
                })
            })?;
        }
        self.pods.push(Pod {
            node: i,
            ns,
            ip: pod_ip,
            host_ifname: host_if,
            container_id,
        });
        Ok(self.pods.len() - 1)
    }

    /// The CNI network config the harness hands `sluice-cni` on node `i`.
    fn cni_config(&self, i: usize, labels: &[(&str, &str)]) -> serde_json::Value {
        let n = &self.nodes[i];
        let labels: serde_json::Map<String, serde_json::Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect();
        serde_json::json!({
            "cniVersion": "1.0.0", "name": "sluice", "type": "sluice-cni",
            "agentSocket": n.socket(),
            "dataDir": n.dir.join("cni"),
            "sluiceMtu": {"mode": "routes", "podMtu": pod_mtu(), "underlayMtu": self.underlay_mtu()},
            "ipam": {"dataDir": n.dir.join("ipam")},
            "runtimeConfig": {"labels": labels},
        })
    }

    fn run_cni(
        &self,
        i: usize,
        command: &str,
        pod_ns: &str,
        id: &str,
        config: &serde_json::Value,
    ) -> Result<serde_json::Value> {
        use std::io::Write;
        let bin = cni_binary()?;
        let mut child = in_ns(&self.nodes[i].ns, &[&bin.to_string_lossy()])
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", format!("/var/run/netns/{pod_ns}"))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/usr/lib/cni")
            .env(
                "CNI_ARGS",
                format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME={id}"),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| HarnessError::Setup(format!("spawn sluice-cni: {e}")))?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(config.to_string().as_bytes());
        }
        let out = child
            .wait_with_output()
            .map_err(|e| HarnessError::Setup(format!("sluice-cni: {e}")))?;
        if !out.status.success() {
            return Err(HarnessError::Setup(format!(
                "sluice-cni {command} failed ({}): {} {}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        if out.stdout.is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_slice(&out.stdout)
            .map_err(|e| HarnessError::Setup(format!("sluice-cni {command} result: {e}")))
    }

    /// Create a pod on node `i` with the CNI plugin (`sluice-cni ADD`, which wires it and calls
    /// the agent's AddPod). Returns its index in `self.pods`.
    pub fn add_pod_cni(&mut self, i: usize, labels: &[(&str, &str)]) -> Result<usize> {
        let j = self.nodes[i].pods;
        self.nodes[i].pods += 1;
        let ns = format!("{}p{j}", self.nodes[i].ns);
        self.add_ns(&ns)?;
        let id = format!("{}-n{i}p{j}", self.prefix);
        let config = self.cni_config(i, labels);
        let result = self.run_cni(i, "ADD", &ns, &id, &config)?;
        let ip = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| HarnessError::Setup(format!("no address in CNI result {result}")))?;
        let host_ifname = result["interfaces"]
            .as_array()
            .and_then(|l| {
                l.iter()
                    .find(|x| x["sandbox"].is_null() || x["sandbox"] == "")
            })
            .and_then(|x| x["name"].as_str())
            .unwrap_or_default()
            .to_owned();
        self.pods.push(Pod {
            node: i,
            ns,
            ip,
            host_ifname,
            container_id: id,
        });
        Ok(self.pods.len() - 1)
    }

    /// `sluice-cni DEL` for a pod made by [`Cluster::add_pod_cni`].
    pub fn del_pod_cni(&self, p: usize) -> Result<()> {
        let pod = &self.pods[p];
        let config = self.cni_config(pod.node, &[]);
        self.run_cni(pod.node, "DEL", &pod.ns, &pod.container_id, &config)
            .map(|_| ())
    }

    /// Send a raw AddPod to node `i`'s agent; on refusal returns the gRPC code (as its Debug name)
    /// and message.
    pub fn add_pod_raw(
        &self,
        i: usize,
        req: AddPodRequest,
    ) -> Result<Result<(), (String, String)>> {
        let socket = self.nodes[i].socket();
        self.runtime.block_on(async {
            let mut c = sluice_control::agent_client::connect(&socket)
                .await
                .map_err(|e| HarnessError::Setup(e.to_string()))?;
            Ok(c.add_pod(req)
                .await
                .map(|_| ())
                .map_err(|s| (format!("{:?}", s.code()), s.message().to_owned())))
        })
    }

    /// DelPod for pod `p` on its agent; returns `existed`.
    pub fn del_pod(&self, p: usize) -> Result<bool> {
        let pod = &self.pods[p];
        let socket = self.nodes[pod.node].socket();
        self.runtime.block_on(async {
            let mut c = sluice_control::agent_client::connect(&socket)
                .await
                .map_err(|e| HarnessError::Setup(e.to_string()))?;
            Ok(c.del_pod(DelPodRequest {
                container_id: pod.container_id.clone(),
                ifname: "eth0".into(),
            })
            .await
            .map_err(|s| HarnessError::Setup(s.message().to_owned()))?
            .into_inner()
            .existed)
        })
    }

    /// `ping -c count` from pod `from` to `to`; Ok when every echo got its reply.
    pub fn ping(&self, from: usize, to: Ipv4Addr, count: u32) -> Result<String> {
        let out = run(&mut in_ns(
            &self.pods[from].ns,
            &[
                "ping",
                "-n",
                "-c",
                &count.to_string(),
                "-i",
                "0.2",
                "-W",
                "2",
                &to.to_string(),
            ],
        ))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !text.contains(&format!("{count} received")) {
            return Err(HarnessError::Setup(format!("ping lost replies:\n{text}")));
        }
        Ok(text)
    }

    /// An iperf3 TCP transfer of `seconds` from pod `client` to pod `server`; returns (bytes
    /// received by the server, Gbit/s).
    pub fn iperf3(&self, client: usize, server: usize, seconds: u32) -> Result<(u64, f64)> {
        self.iperf3_with(client, server, seconds, &[])
    }

    /// iperf3 UDP with 64-byte payloads at full rate; returns (datagrams received by the server,
    /// received datagrams per second).
    pub fn iperf3_udp64(&self, client: usize, server: usize, seconds: u32) -> Result<(u64, f64)> {
        let (bytes, gbps) =
            self.iperf3_with(client, server, seconds, &["-u", "-b", "0", "-l", "64"])?;
        Ok((bytes / 64, gbps * 1e9 / 8.0 / 64.0))
    }

    /// The ifindex of pod `p`'s host veth (in its node's namespace).
    pub fn host_ifindex(&self, p: usize) -> Result<u32> {
        let pod = &self.pods[p];
        let out = ip(
            Some(&self.nodes[pod.node].ns),
            &format!("-o link show {}", pod.host_ifname),
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.split(':')
            .next()
            .and_then(|n| n.trim().parse().ok())
            .ok_or_else(|| HarnessError::Setup(format!("no ifindex in {text:?}")))
    }

    /// iperf3 from pod `client` to pod `server` with extra client arguments.
    pub fn iperf3_with(
        &self,
        client: usize,
        server: usize,
        seconds: u32,
        extra: &[&str],
    ) -> Result<(u64, f64)> {
        self.iperf3_to(client, server, self.pods[server].ip, seconds, extra)
    }

    /// iperf3 from pod `client` to `addr` (pod `server`'s address, or a service address that
    /// leads to it: the server runs on 5201 in pod `server`).
    pub fn iperf3_to(
        &self,
        client: usize,
        server: usize,
        addr: Ipv4Addr,
        seconds: u32,
        extra: &[&str],
    ) -> Result<(u64, f64)> {
        let ns = self.pods[client].ns.clone();
        self.iperf3_from(&ns, server, addr, seconds, extra)
    }

    /// iperf3 from namespace `client_ns` (a pod's, or the switch's for an underlay client) to
    /// `addr`, the server running on 5201 in pod `server`.
    pub fn iperf3_from(
        &self,
        client_ns: &str,
        server: usize,
        addr: Ipv4Addr,
        seconds: u32,
        extra: &[&str],
    ) -> Result<(u64, f64)> {
        let mut srv = in_ns(&self.pods[server].ns, &["iperf3", "-s", "-1", "-J"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| HarnessError::Setup(format!("iperf3 server: {e}")))?;
        std::thread::sleep(Duration::from_millis(300));
        let server_ip = addr.to_string();
        let secs = seconds.to_string();
        let mut argv = vec![
            "iperf3",
            "-c",
            &server_ip,
            "-t",
            &secs,
            "-J",
            "--connect-timeout",
            "3000",
        ];
        argv.extend_from_slice(extra);
        let client_out = in_ns(client_ns, &argv).output();
        let srv_out = {
            let deadline = Instant::now() + Duration::from_secs(5);
            while srv.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = srv.kill();
            srv.wait_with_output()
                .map_err(|e| HarnessError::Setup(format!("iperf3 server: {e}")))?
        };
        let client_out = client_out.map_err(|e| HarnessError::Setup(format!("iperf3: {e}")))?;
        let parse = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).ok();
        let srv_json = parse(&srv_out.stdout);
        // TCP servers report `sum_received`; UDP servers `sum` (bytes received, with losses).
        let sum = srv_json.as_ref().map(|j| {
            if j["end"]["sum_received"].is_object() {
                j["end"]["sum_received"].clone()
            } else {
                j["end"]["sum"].clone()
            }
        });
        let bytes = sum.as_ref().and_then(|s| s["bytes"].as_u64()).unwrap_or(0);
        let bps = sum
            .as_ref()
            .and_then(|s| s["bits_per_second"].as_f64())
            .unwrap_or(0.0);
        if bytes == 0 {
            return Err(HarnessError::Setup(format!(
                "iperf3 moved no bytes: client: {} {}",
                String::from_utf8_lossy(&client_out.stdout)
                    .chars()
                    .take(600)
                    .collect::<String>(),
                String::from_utf8_lossy(&client_out.stderr)
            )));
        }
        Ok((bytes, bps / 1e9))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
        for i in 0..self.nodes.len() {
            let _ = self.stop_agent(i, nix::sys::signal::Signal::SIGTERM);
        }
        // Pods and nodes first (their veths go with them), the switch last.
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
        for m in &self.mounts {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(m)
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Whether a BPF program with this id exists.
pub fn bpf_prog_exists(id: u64) -> bool {
    Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
