//! Shared helpers of the plugin's integration tests: namespaces behind drop guards, running the
//! built binary the way a runtime does (env + stdin), and a minimal in-process Agent server.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

pub const BIN: &str = env!("CARGO_BIN_EXE_sluice-cni");
pub const UPSTREAM: &str = "/usr/lib/cni";

/// Root is needed for namespaces; without it the test fails with the reason, unless
/// SLUICE_ALLOW_SKIP=1, where it says why it skips and returns false.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("SLUICE_ALLOW_SKIP").as_deref() == Ok("1") {
        eprintln!("SKIP {test}: needs root (network namespaces, veths)");
        return false;
    }
    panic!("{test} needs root (network namespaces, veths); run as root or set SLUICE_ALLOW_SKIP=1");
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A network namespace removed on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("slc-{tag}-{}-{n}", std::process::id());
        sh(&["ip", "netns", "add", &name]);
        Netns { name }
    }

    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// Run a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .expect("run ip netns exec")
    }

    /// Run and return stdout, asserting success.
    pub fn run(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "{args:?} in {} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ip -o link` names in the namespace.
    pub fn links(&self) -> Vec<String> {
        self.run(&["ip", "-o", "link", "show"])
            .lines()
            .filter_map(|l| {
                l.split(':')
                    .nth(1)
                    .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
            })
            .collect()
    }

    pub fn ipv4_addrs(&self) -> String {
        self.run(&["ip", "-4", "-o", "addr", "show"])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run command");
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One plugin invocation's outcome.
#[derive(Debug)]
pub struct Call {
    pub ok: bool,
    pub signal: Option<i32>,
    pub json: Value,
    pub stdout: String,
    pub stderr: String,
}

impl Call {
    pub fn code(&self) -> u64 {
        assert!(!self.ok, "expected an error, got success: {}", self.stdout);
        self.json["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("error without code: {}", self.stdout))
    }

    pub fn ok(&self) -> &Value {
        assert!(self.ok, "plugin failed: {} {}", self.stdout, self.stderr);
        &self.json
    }
}

/// Run `plugin` (a path) inside `host` (or the test's namespace) with `env` and `stdin`.
pub fn exec_plugin(plugin: &str, host: Option<&Netns>, env: &[(&str, &str)], stdin: &[u8]) -> Call {
    use std::os::unix::process::ExitStatusExt;
    let mut cmd = match host {
        Some(h) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &h.name, plugin]);
            c
        }
        None => Command::new(plugin),
    };
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn plugin");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait plugin");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    Call {
        ok: out.status.success(),
        signal: out.status.signal(),
        json: serde_json::from_str(stdout.trim()).unwrap_or(Value::Null),
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A node: a host namespace, an IPAM directory, a network configuration.
pub struct Node {
    pub host: Netns,
    pub dir: tempfile::TempDir,
    pub conf: Value,
}

impl Node {
    /// A standalone node (no agent) allocating from `subnet`.
    pub fn standalone(tag: &str, version: &str, subnet: &str) -> Self {
        let host = Netns::new(&format!("{tag}-h"));
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = json!({
            "cniVersion": version, "name": "slc-net", "type": "sluice-cni", "agent": false,
            "clusterCidr": "10.244.0.0/16",
            "ipam": { "subnet": subnet, "dataDir": dir.path() },
        });
        Node { host, dir, conf }
    }

    pub fn ipam_dir(&self) -> PathBuf {
        self.dir
            .path()
            .join(self.conf["name"].as_str().unwrap_or_default())
    }

    /// Allocation records in the IPAM directory.
    pub fn allocations(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(self.ipam_dir()) else {
            return Vec::new();
        };
        let mut v: Vec<String> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "lock" && n != "last")
            .collect();
        v.sort();
        v
    }

    pub fn host_veths(&self) -> Vec<String> {
        self.host
            .links()
            .into_iter()
            .filter(|l| l.starts_with("sl"))
            .collect()
    }

    pub fn call(&self, command: &str, conf: &Value, cid: &str, netns: &str, ifname: &str) -> Call {
        self.call_env(command, conf, cid, netns, ifname, &[])
    }

    pub fn call_env(
        &self,
        command: &str,
        conf: &Value,
        cid: &str,
        netns: &str,
        ifname: &str,
        extra: &[(&str, &str)],
    ) -> Call {
        let path = format!("{}:{UPSTREAM}", Path::new(BIN).parent().unwrap().display());
        let mut env = vec![
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", cid),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", ifname),
            ("CNI_PATH", path.as_str()),
        ];
        env.extend_from_slice(extra);
        exec_plugin(BIN, Some(&self.host), &env, conf.to_string().as_bytes())
    }

    pub fn add(&self, cid: &str, pod: &Netns) -> Call {
        self.call("ADD", &self.conf, cid, &pod.path(), "eth0")
    }

    pub fn del(&self, cid: &str, pod: &Netns) -> Call {
        self.call("DEL", &self.conf, cid, &pod.path(), "eth0")
    }
}

/// Merge `patch` into a copy of `base`.
pub fn with(base: &Value, patch: Value) -> Value {
    let mut v = base.clone();
    if let (Some(o), Value::Object(p)) = (v.as_object_mut(), patch) {
        for (k, x) in p {
            o.insert(k, x);
        }
    }
    v
}

/// The pod address of an ADD result.
pub fn result_ip(result: &Value) -> String {
    result["ips"][0]["address"]
        .as_str()
        .expect("ips[0].address")
        .trim_end_matches("/32")
        .to_string()
}

// ---------------------------------------------------------------------------------------------
// A minimal Agent server (the real protocol on a real unix socket) that records calls.

use sluice_control::agent_api::agent_server::{Agent, AgentServer};
use sluice_control::agent_api::*;

#[derive(Debug, Clone)]
pub enum Recorded {
    Add(Box<AddPodRequest>),
    Del(DelPodRequest),
}

#[derive(Clone)]
struct Recorder {
    calls: Arc<Mutex<Vec<Recorded>>>,
    info: NodeInfoResponse,
    fail_add: bool,
    ready: bool,
}

#[tonic::async_trait]
impl Agent for Recorder {
    /// The recorder has no data path, so it has no flow events to stream.
    type ObserveStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<FlowEvent, tonic::Status>> + Send + 'static>,
    >;
    async fn observe(
        &self,
        _: tonic::Request<ObserveRequest>,
    ) -> Result<tonic::Response<Self::ObserveStream>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "the recording agent has no flow events",
        ))
    }
    async fn trace(
        &self,
        _: tonic::Request<TraceRequest>,
    ) -> Result<tonic::Response<TraceResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "the recording agent has no tables to trace through",
        ))
    }
    async fn node_info(
        &self,
        _: tonic::Request<NodeInfoRequest>,
    ) -> Result<tonic::Response<NodeInfoResponse>, tonic::Status> {
        Ok(tonic::Response::new(self.info.clone()))
    }
    async fn add_pod(
        &self,
        r: tonic::Request<AddPodRequest>,
    ) -> Result<tonic::Response<AddPodResponse>, tonic::Status> {
        if self.fail_add {
            return Err(tonic::Status::unavailable("test server refuses AddPod"));
        }
        self.calls
            .lock()
            .unwrap()
            .push(Recorded::Add(Box::new(r.into_inner())));
        Ok(tonic::Response::new(AddPodResponse {}))
    }
    async fn del_pod(
        &self,
        r: tonic::Request<DelPodRequest>,
    ) -> Result<tonic::Response<DelPodResponse>, tonic::Status> {
        self.calls
            .lock()
            .unwrap()
            .push(Recorded::Del(r.into_inner()));
        Ok(tonic::Response::new(DelPodResponse { existed: true }))
    }
    async fn status(
        &self,
        _: tonic::Request<StatusRequest>,
    ) -> Result<tonic::Response<StatusResponse>, tonic::Status> {
        Ok(tonic::Response::new(StatusResponse {
            ready: self.ready,
            message: if self.ready {
                String::new()
            } else {
                "test server not ready".into()
            },
        }))
    }
}

/// A recording Agent server on a temporary unix socket, stopped on drop.
pub struct TestAgentServer {
    pub socket: PathBuf,
    pub calls: Arc<Mutex<Vec<Recorded>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl TestAgentServer {
    pub fn start(pod_cidr: &str, fail_add: bool, ready: bool) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("agent.sock");
        let calls = Arc::new(Mutex::new(Vec::new()));
        let svc = Recorder {
            calls: calls.clone(),
            info: NodeInfoResponse {
                node_name: "test-node".into(),
                pod_cidr: pod_cidr.into(),
                cluster_cidr: "10.244.0.0/16".into(),
                service_cidr: "10.96.0.0/12".into(),
                underlay_mtu: 1500,
                pod_mtu: 65535,
            },
            fail_add,
            ready,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let path = socket.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::UnixListener::bind(&path).expect("bind agent socket");
                bound_tx.send(()).expect("signal bound");
                tonic::transport::Server::builder()
                    .add_service(AgentServer::new(svc))
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::UnixListenerStream::new(listener),
                        async {
                            let _ = stopped.await;
                        },
                    )
                    .await
                    .expect("serve");
            });
        });
        bound_rx.recv().expect("server bound");
        TestAgentServer {
            socket,
            calls,
            stop: Some(stop),
            thread: Some(thread),
            _dir: dir,
        }
    }

    pub fn recorded(&self) -> Vec<Recorded> {
        self.calls.lock().unwrap().clone()
    }
}

impl Drop for TestAgentServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn args_map(s: &str) -> BTreeMap<String, String> {
    s.split(';')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.into(), v.into()))
        .collect()
}
