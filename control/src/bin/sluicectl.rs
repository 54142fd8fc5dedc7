//! `sluicectl`: the operator's command line for the Sluice control plane.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use sluice_control::api::{self, Kind, ObjectRef, object::Body};
use sluice_control::client::{ClientConfig, ControlClient};
use sluice_control::manifest;
use sluice_control::model::{self, K8sObject};
use sluice_control::server::ServerConfig;

/// Control a Sluice cluster: apply Kubernetes manifests, inspect objects, nodes and agents.
#[derive(Debug, Parser)]
#[command(
    name = "sluicectl",
    version,
    after_help = "Examples:\n  \
  sluicectl --server https://10.0.0.1:7443 --ca ca.pem --token-file ~/.sluice/token apply -f examples/\n  \
  export SLUICE_SERVER=https://10.0.0.1:7443 SLUICE_CA=ca.pem SLUICE_TOKEN=...\n  \
  sluicectl get services -A\n  \
  sluicectl status"
)]
struct Cli {
    /// Control plane endpoint (https://host:port; http:// only for a plaintext development server).
    #[arg(
        long,
        env = "SLUICE_SERVER",
        default_value = "https://127.0.0.1:7443",
        global = true
    )]
    server: String,
    /// CA certificate (PEM) that signed the server's certificate.
    #[arg(long, env = "SLUICE_CA", global = true)]
    ca: Option<PathBuf>,
    /// Bearer token.
    #[arg(long, env = "SLUICE_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// File holding the bearer token.
    #[arg(
        long,
        env = "SLUICE_TOKEN_FILE",
        global = true,
        conflicts_with = "token"
    )]
    token_file: Option<PathBuf>,
    /// Server name expected in its certificate (default: the host in --server).
    #[arg(long, global = true)]
    tls_server_name: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or replace objects from Kubernetes manifests (YAML or JSON), all or nothing.
    #[command(after_help = "Examples:\n  \
  sluicectl apply -f service.yaml\n  \
  sluicectl apply -f manifests/ -f policy.json\n  \
  cat all.yaml | sluicectl apply -f -\n  \
  sluicectl apply -f examples/ --dry-run\n\n\
Kinds: Namespace, Service, EndpointSlice, NetworkPolicy (networking.k8s.io/v1), Pod (labels and ports).\n\
Every document is validated before anything is sent; the server applies them in one transaction.")]
    Apply(ApplyArgs),
    /// List objects of a kind, or show one.
    #[command(after_help = "Examples:\n  \
  sluicectl get services -n shop\n  \
  sluicectl get svc web -n shop -o yaml\n  \
  sluicectl get netpol -A -o json\n  \
  sluicectl get pods -A\n\n\
Kinds: nodes, pods, namespaces (ns), services (svc), endpointslices (eps), networkpolicies (netpol), all.")]
    Get(GetArgs),
    /// Delete objects by kind and name, or those in manifests.
    #[command(after_help = "Examples:\n  \
  sluicectl delete svc web -n shop\n  \
  sluicectl delete netpol deny-all allow-web -n shop\n  \
  sluicectl delete -f examples/policy.yaml\n  \
  sluicectl delete node node-b      # also removes its pods and frees its pod CIDR")]
    Delete(DeleteArgs),
    /// List nodes: pod CIDR, underlay address, VTEP MAC, agent connection.
    #[command(after_help = "Examples:\n  sluicectl nodes\n  sluicectl nodes -o json")]
    Nodes(OutputArgs),
    /// The control plane and each agent: connected, synced revision, last sync.
    #[command(after_help = "Examples:\n  sluicectl status\n  sluicectl status -o json")]
    Status(OutputArgs),
    /// Flow events of the cluster or of a node's agent: what was forwarded or dropped, and why.
    #[command(after_help = "Examples:\n  \
  sluicectl observe --verdict DROPPED --last 20\n  \
  sluicectl observe --node n2 --pod shop/web --follow -o json\n  \
  sluicectl observe --from default/client --to 10.96.0.10 --port 80 --protocol TCP --since 5m\n  \
  sluicectl observe --agent-socket /run/sluice/agent.sock --verdict DROPPED\n\n\
Without --agent-socket, events of every node come from the control plane (--server, operator\n\
token), which the agents push them to; --node keeps one node's. With --agent-socket (repeatable),\n\
they come straight from those agents' unix sockets. -o json prints one object per line (fields in\n\
control/README.md, \"Flow events\").")]
    Observe(ObserveArgs),
    /// Send a synthetic packet through a node's live tables and print every stage's decision.
    #[command(after_help = "Examples:\n  \
  sluicectl trace --agent-socket /run/sluice/agent.sock --from demo/client --to svc/demo/web:80\n  \
  sluicectl trace --agent-socket n1=/run/n1/agent.sock --agent-socket n2=/run/n2/agent.sock \\\n      \
--from demo/client --to demo/db --protocol tcp --sport 41000 --flags SYN -o json\n  \
  sluicectl trace --agent-socket /run/sluice/agent.sock --pcap dropped.pcap\n\n\
--from: a pod (namespace/name) or an IPv4 address (pod, node, outside host). --to: a pod, a Service\n\
(svc/namespace/name[:port]), or an IPv4 address with an optional :port (pod, ClusterIP, NodePort on\n\
a node address, outside host). The agent of the source's node builds the frame and runs it through\n\
its current tables and conntrack without changing anything. A packet that leaves for another node is\n\
traced there too when that node's agent socket is given as NODE=PATH. --pcap traces each captured\n\
frame instead. -o json: see control/README.md (\"Trace\").")]
    Trace(TraceArgs),
    /// Print a shell completion script.
    #[command(after_help = "Examples:\n  \
  sluicectl completion bash > /etc/bash_completion.d/sluicectl\n  \
  sluicectl completion zsh > \"${fpath[1]}/_sluicectl\"")]
    Completion { shell: clap_complete::Shell },
}

// The arguments of each command. No doc comments on these structs: the variant's doc comment is
// the command's description.

#[derive(Debug, Args)]
struct ApplyArgs {
    /// File, directory (its *.yaml, *.yml, *.json) or - for stdin. Repeatable.
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<String>,
    /// Validate only; send nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Debug, Args)]
struct GetArgs {
    kind: String,
    name: Option<String>,
    /// Namespace (default: "default" for namespaced kinds).
    #[arg(short, long)]
    namespace: Option<String>,
    /// Every namespace.
    #[arg(short = 'A', long)]
    all_namespaces: bool,
    #[arg(short, long, value_enum, default_value = "table")]
    output: Output,
}

#[derive(Debug, Args)]
struct DeleteArgs {
    kind: Option<String>,
    names: Vec<String>,
    #[arg(short, long)]
    namespace: Option<String>,
    /// Delete the objects named in these manifests.
    #[arg(short = 'f', long = "filename", conflicts_with_all = ["kind", "names"])]
    files: Vec<String>,
}

#[derive(Debug, Args)]
struct OutputArgs {
    #[arg(short, long, value_enum, default_value = "table")]
    output: Output,
}

#[derive(Debug, Args)]
struct ObserveArgs {
    /// FORWARDED or DROPPED.
    #[arg(long, value_parser = ["FORWARDED", "DROPPED", "forwarded", "dropped"])]
    verdict: Option<String>,
    /// A pod (namespace/name) on either side.
    #[arg(long)]
    pod: Option<String>,
    /// A namespace of a pod on either side.
    #[arg(short, long)]
    namespace: Option<String>,
    /// Source: namespace/name or IP.
    #[arg(long)]
    from: Option<String>,
    /// Destination: namespace/name or IP (service VIP or backend).
    #[arg(long)]
    to: Option<String>,
    /// Destination port (service or backend port).
    #[arg(long)]
    port: Option<u16>,
    /// TCP, UDP, ICMP or SCTP.
    #[arg(long)]
    protocol: Option<String>,
    /// Only events of this node.
    #[arg(long)]
    node: Option<String>,
    /// Only events of the last DURATION (e.g. 30s, 5m, 1h).
    #[arg(long)]
    since: Option<String>,
    /// At most the N newest matching events of the history.
    #[arg(long)]
    last: Option<u32>,
    /// Keep printing new events.
    #[arg(short, long)]
    follow: bool,
    /// Ask this agent's unix socket instead of the control plane (repeatable; e.g.
    /// /run/sluice/agent.sock for the local node).
    #[arg(long = "agent-socket")]
    agent_sockets: Vec<PathBuf>,
    #[arg(short, long, value_enum, default_value = "table")]
    output: Output,
}

#[derive(Debug, Args)]
struct TraceArgs {
    /// Source: namespace/name or IPv4 address.
    #[arg(long, required_unless_present = "pcap")]
    from: Option<String>,
    /// Destination: namespace/name, svc/namespace/name[:port], or IPv4[:port].
    #[arg(long, required_unless_present = "pcap")]
    to: Option<String>,
    /// tcp, udp or icmp.
    #[arg(long, default_value = "tcp", value_parser = ["tcp", "udp", "icmp", "TCP", "UDP", "ICMP"])]
    protocol: String,
    /// Source port (default 40000; the echo id for icmp).
    #[arg(long)]
    sport: Option<u16>,
    /// Destination port when --to names none (default: the Service's port, else 80).
    #[arg(long)]
    dport: Option<u16>,
    /// TCP flags, comma separated (default SYN).
    #[arg(long)]
    flags: Option<String>,
    /// The node whose agent traces first (a NODE of --agent-socket NODE=PATH).
    #[arg(long)]
    node: Option<String>,
    /// Trace every frame of this pcap file (Ethernet) instead of a synthetic packet.
    #[arg(long, conflicts_with_all = ["from", "to"])]
    pcap: Option<PathBuf>,
    /// An agent's unix socket, PATH or NODE=PATH (repeatable). Required: tracing through the
    /// control plane is not available yet.
    #[arg(long = "agent-socket", required = true)]
    agent_sockets: Vec<String>,
    #[arg(short, long, value_enum, default_value = "table")]
    output: Output,
}

fn config(cli: &Cli) -> anyhow::Result<ClientConfig> {
    let mut cfg = ClientConfig::new(cli.server.clone());
    if let Some(ca) = &cli.ca {
        cfg = cfg.with_ca_pem(
            std::fs::read(ca).with_context(|| format!("reading --ca {}", ca.display()))?,
        );
    }
    let token = match (&cli.token, &cli.token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(f)) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading --token-file {}", f.display()))?
                .trim()
                .to_string(),
        ),
        _ => None,
    };
    if let Some(t) = token {
        cfg = cfg.with_token(t);
    }
    if let Some(d) = &cli.tls_server_name {
        cfg = cfg.with_tls_domain(d.clone());
    }
    Ok(cfg)
}

fn kind_arg(s: &str) -> anyhow::Result<Kind> {
    if s.eq_ignore_ascii_case("all") {
        return Ok(Kind::Unspecified);
    }
    model::parse_kind(s).with_context(|| {
        format!("unknown kind {s:?} (nodes, pods, namespaces, services, endpointslices, networkpolicies, all)")
    })
}

/// The object as a Kubernetes-style JSON value.
fn object_json(o: &api::Object) -> serde_json::Value {
    match &o.body {
        Some(Body::K8s(k)) => serde_json::from_str(&k.json).unwrap_or(serde_json::Value::Null),
        Some(Body::Node(n)) => serde_json::json!({
            "kind": "Node",
            "metadata": {"name": n.name},
            "spec": {"podCIDR": n.pod_cidr, "underlayIP": n.underlay_ip, "vtepMAC": mac(&n.vtep_mac)},
        }),
        Some(Body::Pod(p)) => serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": p.name, "namespace": p.namespace, "labels": p.labels},
            "spec": {"nodeName": p.node, "containers": [{"name": "main", "ports": p.ports.iter().map(|cp| serde_json::json!({
                "name": cp.name, "containerPort": cp.port, "protocol": cp.protocol})).collect::<Vec<_>>()}]},
            "status": {"podIP": p.ip},
        }),
        None => serde_json::Value::Null,
    }
}

fn mac(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn print_value(v: &serde_json::Value, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Yaml => print!("{}", serde_saphyr::to_string(v).context("rendering YAML")?),
        _ => println!("{}", serde_json::to_string_pretty(v)?),
    }
    Ok(())
}

/// A table's header row.
fn header(titles: &[&str]) -> Vec<String> {
    titles.iter().map(|t| t.to_string()).collect()
}

fn table(rows: Vec<Vec<String>>) {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = std::io::stdout().lock();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, s)| format!("{s:<w$}", w = widths[i]))
            .collect();
        let _ = writeln!(out, "{}", line.join("   ").trim_end());
    }
}

fn summary(o: &api::Object) -> Vec<String> {
    let r = model::object_ref(o).unwrap_or_default();
    let kind = model::kind_name(r.kind()).to_string();
    let detail = match &o.body {
        Some(Body::Node(n)) => format!("podCIDR={} underlay={}", n.pod_cidr, n.underlay_ip),
        Some(Body::Pod(p)) => format!("ip={} node={} labels={}", p.ip, p.node, labels(&p.labels)),
        Some(Body::K8s(k)) => match K8sObject::from_json(k.kind(), &k.json) {
            Ok(K8sObject::Service(s)) => {
                let spec = s.spec.unwrap_or_default();
                let ports: Vec<String> = spec
                    .ports
                    .unwrap_or_default()
                    .iter()
                    .map(|p| match p.node_port {
                        Some(np) => format!(
                            "{}:{}/{}",
                            p.port,
                            np,
                            p.protocol.as_deref().unwrap_or("TCP")
                        ),
                        None => format!("{}/{}", p.port, p.protocol.as_deref().unwrap_or("TCP")),
                    })
                    .collect();
                format!(
                    "type={} clusterIP={} ports={} affinity={}",
                    spec.type_.unwrap_or_else(|| "ClusterIP".into()),
                    spec.cluster_ip.unwrap_or_default(),
                    ports.join(","),
                    spec.session_affinity.unwrap_or_else(|| "None".into())
                )
            }
            Ok(K8sObject::EndpointSlice(e)) => {
                let svc = e
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("kubernetes.io/service-name"))
                    .cloned()
                    .unwrap_or_default();
                let eps = e.endpoints.unwrap_or_default();
                let ready = eps
                    .iter()
                    .filter(|ep| ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
                    .count();
                format!("service={svc} endpoints={} ready={ready}", eps.len())
            }
            Ok(K8sObject::NetworkPolicy(p)) => {
                let spec = p.spec.unwrap_or_default();
                let sel = spec
                    .pod_selector
                    .and_then(|s| s.match_labels)
                    .map(|m| labels(&m.into_iter().collect()))
                    .unwrap_or_default();
                format!(
                    "podSelector={} types={}",
                    if sel.is_empty() { "{}".into() } else { sel },
                    spec.policy_types.unwrap_or_default().join(",")
                )
            }
            Ok(_) | Err(_) => String::new(),
        },
        None => String::new(),
    };
    vec![kind, r.namespace, r.name, o.revision.to_string(), detail]
}

fn labels(l: &std::collections::HashMap<String, String>) -> String {
    let mut v: Vec<_> = l.iter().map(|(k, v)| format!("{k}={v}")).collect();
    v.sort();
    v.join(",")
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Completion { shell } => {
            completion(*shell);
            Ok(())
        }
        Command::Observe(args) => observe(&cli, args).await,
        Command::Trace(args) => trace(args).await,
        Command::Apply(args) => apply(&cli, args).await,
        Command::Get(args) => get(&cli, args).await,
        Command::Delete(args) => delete(&cli, args).await,
        Command::Nodes(args) => nodes(&cli, args.output).await,
        Command::Status(args) => status(&cli, args.output).await,
    }
}

async fn connect(cli: &Cli) -> anyhow::Result<ControlClient> {
    Ok(ControlClient::connect(&config(cli)?).await?)
}

/// The namespace a command means for `kind`: the one given or "default" for namespaced kinds,
/// none for the others.
fn namespace_for(kind: Kind, namespace: Option<&str>) -> String {
    if model::is_namespaced(kind) {
        namespace.unwrap_or(model::DEFAULT_NAMESPACE).to_string()
    } else {
        String::new()
    }
}

fn completion(shell: clap_complete::Shell) {
    clap_complete::generate(
        shell,
        &mut Cli::command(),
        "sluicectl",
        &mut std::io::stdout(),
    );
}

/// `--since DURATION` as Unix nanoseconds (0: no bound).
fn since_unix_ns(since: Option<&str>) -> anyhow::Result<u64> {
    let Some(s) = since else { return Ok(0) };
    let d =
        sluice_control::observe::parse_duration(s).map_err(|e| anyhow::anyhow!("--since {e}"))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Ok(u64::try_from(now.saturating_sub(d).as_nanos()).unwrap_or(u64::MAX))
}

async fn observe(cli: &Cli, args: &ObserveArgs) -> anyhow::Result<()> {
    let req = sluice_control::agent_api::ObserveRequest {
        verdict: args
            .verdict
            .clone()
            .unwrap_or_default()
            .to_ascii_uppercase(),
        pod: args.pod.clone().unwrap_or_default(),
        namespace: args.namespace.clone().unwrap_or_default(),
        from: args.from.clone().unwrap_or_default(),
        to: args.to.clone().unwrap_or_default(),
        port: args.port.map(u32::from).unwrap_or(0),
        protocol: args
            .protocol
            .clone()
            .unwrap_or_default()
            .to_ascii_uppercase(),
        since_unix_ns: since_unix_ns(args.since.as_deref())?,
        last: args.last.unwrap_or(0),
        follow: args.follow,
        node: args.node.clone().unwrap_or_default(),
    };
    if !args.agent_sockets.is_empty() {
        return observe_agents(req, &args.agent_sockets, args.output).await;
    }
    let stream = connect(cli)
        .await?
        .observe(req.clone())
        .await
        .context("observe on the control plane")?;
    print_events(req, vec![stream], args.output).await
}

/// `--agent-socket` values: (node name or "", path).
fn agent_sockets(v: &[String]) -> Vec<(String, PathBuf)> {
    v.iter()
        .map(|s| match s.split_once('=') {
            Some((n, p)) => (n.to_owned(), PathBuf::from(p)),
            None => (String::new(), PathBuf::from(s)),
        })
        .collect()
}

/// Trace `req` on the agent at `first`, then on the node the packet leaves for, as long as an
/// agent socket is known for it (at most 4 nodes). Returns the node traces and a note on where
/// the trace stops short.
async fn trace_across(
    req: sluice_control::agent_api::TraceRequest,
    first: &std::path::Path,
    sockets: &[(String, PathBuf)],
) -> anyhow::Result<(Vec<sluice_control::agent_api::NodeTrace>, String)> {
    let mut nodes = Vec::new();
    let mut req = req;
    let mut at = first.to_path_buf();
    for _ in 0..4 {
        let mut c = sluice_control::agent_client::connect(&at).await?;
        let t = c
            .trace(req)
            .await
            .with_context(|| format!("trace on {}", at.display()))?
            .into_inner()
            .trace
            .context("the agent answered without a trace")?;
        let next = (
            t.next_node.clone(),
            t.next_frame.clone(),
            t.next_underlay_ip.clone(),
        );
        nodes.push(t);
        if next.0.is_empty() && next.2.is_empty() {
            return Ok((nodes, String::new()));
        }
        if next.1.is_empty() {
            return Ok((
                nodes,
                format!(
                    "the packet leaves for node {} ({}) in segments; not traced there",
                    next.0, next.2
                ),
            ));
        }
        let Some((_, path)) = sockets.iter().find(|(n, _)| *n == next.0) else {
            return Ok((
                nodes,
                format!(
                    "the packet continues on node {} ({}); give --agent-socket {}=PATH to trace it there",
                    next.0, next.2, next.0
                ),
            ));
        };
        at = path.clone();
        req = sluice_control::agent_api::TraceRequest {
            frame: next.1,
            ..Default::default()
        };
    }
    Ok((nodes, "stopped after 4 nodes".into()))
}

async fn trace(args: &TraceArgs) -> anyhow::Result<()> {
    let sockets = agent_sockets(&args.agent_sockets);
    let first = match &args.node {
        Some(n) => sockets
            .iter()
            .find(|(name, _)| name == n)
            .with_context(|| format!("--node {n}: no --agent-socket {n}=PATH"))?,
        None => &sockets[0],
    };
    let mut reqs = Vec::new();
    if let Some(p) = &args.pcap {
        let data = std::fs::read(p).with_context(|| format!("read {}", p.display()))?;
        let frames = sluice_control::trace::pcap_frames(&data)
            .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
        if frames.is_empty() {
            bail!("{}: no frames", p.display());
        }
        for f in frames {
            reqs.push(sluice_control::agent_api::TraceRequest {
                frame: f,
                ..Default::default()
            });
        }
    } else {
        reqs.push(sluice_control::agent_api::TraceRequest {
            from: args.from.clone().unwrap_or_default(),
            to: args.to.clone().unwrap_or_default(),
            protocol: args.protocol.to_ascii_lowercase(),
            src_port: args.sport.map(u32::from).unwrap_or(0),
            dst_port: args.dport.map(u32::from).unwrap_or(0),
            tcp_flags: args.flags.clone().unwrap_or_default(),
            ..Default::default()
        });
    }
    let many = reqs.len() > 1;
    let mut out = std::io::stdout().lock();
    for (i, req) in reqs.into_iter().enumerate() {
        let (nodes, note) = trace_across(req, &first.1, &sockets).await?;
        match args.output {
            Output::Json | Output::Yaml => {
                let mut j = sluice_control::trace::to_json(&nodes, &note);
                if many {
                    j["frame"] = serde_json::json!(i + 1);
                }
                writeln!(out, "{j}")?;
            }
            Output::Table => {
                if many {
                    writeln!(out, "frame {}:", i + 1)?;
                }
                write!(out, "{}", sluice_control::trace::to_table(&nodes, &note))?;
            }
        }
    }
    Ok(())
}

async fn apply(cli: &Cli, args: &ApplyArgs) -> anyhow::Result<()> {
    let mut docs = Vec::new();
    for f in &args.files {
        docs.extend(manifest::read_path(f)?);
    }
    if docs.is_empty() {
        bail!("no objects in {}", args.files.join(", "));
    }
    // The server checks again with its own ranges; these are the defaults, for early errors.
    let defaults = ServerConfig::default();
    manifest::validate_all(&mut docs, defaults.service_cidr, defaults.node_ports)?;
    if args.dry_run {
        for d in &docs {
            let p = d.object.to_proto();
            println!(
                "{} {} validated (dry run)",
                model::kind_name(p.kind()),
                qualified(&p.namespace, &p.name)
            );
        }
        return Ok(());
    }
    let client = connect(cli).await?;
    let objects: Vec<K8sObject> = docs.into_iter().map(|d| d.object).collect();
    let resp = client.apply_k8s(&objects).await?;
    for o in &resp.objects {
        let r = model::object_ref(o).unwrap_or_default();
        println!(
            "{} {} applied",
            model::kind_name(r.kind()),
            qualified(&r.namespace, &r.name)
        );
    }
    println!("revision {}", resp.revision);
    Ok(())
}

async fn get(cli: &Cli, args: &GetArgs) -> anyhow::Result<()> {
    let kind = kind_arg(&args.kind)?;
    let ns = if args.all_namespaces {
        String::new()
    } else {
        namespace_for(kind, args.namespace.as_deref())
    };
    let resp = connect(cli).await?.list(kind, &ns).await?;
    let objects: Vec<&api::Object> = resp
        .objects
        .iter()
        .filter(|o| {
            args.name
                .as_ref()
                .is_none_or(|n| model::object_ref(o).is_some_and(|r| &r.name == n))
        })
        .collect();
    if let Some(n) = &args.name
        && objects.is_empty()
    {
        bail!("{} {} not found", model::kind_name(kind), qualified(&ns, n));
    }
    match args.output {
        Output::Table => {
            let mut rows = vec![header(&[
                "KIND",
                "NAMESPACE",
                "NAME",
                "REVISION",
                "DETAILS",
            ])];
            rows.extend(objects.iter().map(|o| summary(o)));
            table(rows);
        }
        _ if args.name.is_some() && objects.len() == 1 => {
            print_value(&object_json(objects[0]), args.output)?
        }
        _ => print_value(
            &serde_json::json!({"apiVersion": "v1", "kind": "List", "items": objects.iter().map(|o| object_json(o)).collect::<Vec<_>>()}),
            args.output,
        )?,
    }
    Ok(())
}

async fn delete(cli: &Cli, args: &DeleteArgs) -> anyhow::Result<()> {
    let refs = if !args.files.is_empty() {
        refs_in_manifests(&args.files)?
    } else {
        let Some(kind) = &args.kind else {
            bail!("name a kind and names, or give -f FILE")
        };
        let kind = kind_arg(kind)?;
        if kind == Kind::Unspecified || args.names.is_empty() {
            bail!("name a kind and at least one name");
        }
        let ns = namespace_for(kind, args.namespace.as_deref());
        args.names
            .iter()
            .map(|n| ObjectRef {
                kind: kind as i32,
                namespace: ns.clone(),
                name: n.clone(),
            })
            .collect()
    };
    let n = connect(cli).await?.delete(refs.clone()).await?;
    println!("{n} of {} deleted", refs.len());
    Ok(())
}

/// The objects the manifests in `files` name.
fn refs_in_manifests(files: &[String]) -> anyhow::Result<Vec<ObjectRef>> {
    let defaults = ServerConfig::default();
    let mut refs = Vec::new();
    for f in files {
        for mut d in manifest::read_path(f)? {
            // Fill the default namespace; other validation errors do not matter for deletion.
            let _ = d
                .object
                .validate(defaults.service_cidr, defaults.node_ports);
            let p = d.object.to_proto();
            refs.push(ObjectRef {
                kind: p.kind,
                namespace: p.namespace,
                name: p.name,
            });
        }
    }
    Ok(refs)
}

async fn nodes(cli: &Cli, output: Output) -> anyhow::Result<()> {
    let client = connect(cli).await?;
    let nodes = client.list(Kind::Node, "").await?;
    let status = client.status().await?;
    match output {
        Output::Table => {
            let mut rows = vec![header(&[
                "NAME", "POD CIDR", "UNDERLAY", "VTEP MAC", "AGENT", "SYNCED",
            ])];
            for o in &nodes.objects {
                if let Some(Body::Node(n)) = &o.body {
                    let a = status.agents.iter().find(|a| a.node == n.name);
                    let connected = a.is_some_and(|a| a.connected);
                    rows.push(vec![
                        n.name.clone(),
                        n.pod_cidr.clone(),
                        n.underlay_ip.clone(),
                        mac(&n.vtep_mac),
                        if connected {
                            "connected"
                        } else {
                            "disconnected"
                        }
                        .into(),
                        a.map_or(0, |a| a.synced_revision).to_string(),
                    ]);
                }
            }
            table(rows);
        }
        _ => print_value(
            &serde_json::Value::Array(nodes.objects.iter().map(object_json).collect()),
            output,
        )?,
    }
    Ok(())
}

async fn status(cli: &Cli, output: Output) -> anyhow::Result<()> {
    let s = connect(cli).await?.status().await?;
    if !matches!(output, Output::Table) {
        let agents: Vec<serde_json::Value> = s
            .agents
            .iter()
            .map(|a| {
                serde_json::json!({"node": a.node, "connected": a.connected, "syncedRevision": a.synced_revision,
                "lastSyncUnixMs": a.last_sync_unix_ms})
            })
            .collect();
        return print_value(
            &serde_json::json!({"server": cli.server, "revision": s.revision, "store": s.store, "objects": s.objects,
                "clusterCIDR": s.cluster_cidr, "serviceCIDR": s.service_cidr, "agents": agents}),
            output,
        );
    }
    println!(
        "control plane {}: revision {}, store {}, {} objects, cluster CIDR {}, service CIDR {}",
        cli.server, s.revision, s.store, s.objects, s.cluster_cidr, s.service_cidr
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let mut rows = vec![header(&["AGENT", "CONNECTED", "REVISION", "LAST SYNC"])];
    for a in &s.agents {
        rows.push(vec![
            a.node.clone(),
            a.connected.to_string(),
            a.synced_revision.to_string(),
            if a.last_sync_unix_ms == 0 {
                "never".into()
            } else {
                format!("{:.1}s ago", (now - a.last_sync_unix_ms) as f64 / 1000.0)
            },
        ]);
    }
    table(rows);
    Ok(())
}

fn qualified(ns: &str, name: &str) -> String {
    if ns.is_empty() {
        name.to_string()
    } else {
        format!("{ns}/{name}")
    }
}

/// Print one event in the chosen form.
fn print_event(
    out: &mut impl Write,
    ev: &sluice_control::agent_api::FlowEvent,
    o: Output,
) -> std::io::Result<()> {
    match o {
        Output::Json | Output::Yaml => writeln!(out, "{}", sluice_control::observe::to_json(ev)),
        Output::Table => writeln!(out, "{}", sluice_control::observe::to_table_row(ev)),
    }
}

/// Print the events of the agents listening on `sockets`.
async fn observe_agents(
    req: sluice_control::agent_api::ObserveRequest,
    sockets: &[PathBuf],
    output: Output,
) -> anyhow::Result<()> {
    let mut streams = Vec::new();
    for s in sockets {
        let mut c = sluice_control::agent_client::connect(s).await?;
        let stream = c
            .observe(req.clone())
            .await
            .with_context(|| format!("observe on {}", s.display()))?
            .into_inner();
        streams.push(stream);
    }
    print_events(req, streams, output).await
}

/// Print the events of `streams` (without `follow`: merged by time, the newest `req.last`).
async fn print_events(
    req: sluice_control::agent_api::ObserveRequest,
    streams: Vec<tonic::Streaming<sluice_control::agent_api::FlowEvent>>,
    output: Output,
) -> anyhow::Result<()> {
    use futures::StreamExt;
    let mut out = std::io::stdout().lock();
    if matches!(output, Output::Table) {
        writeln!(out, "{}", sluice_control::observe::TABLE_HEADER)?;
    }
    if !req.follow {
        // Several nodes: merge by time, then keep the newest --last.
        let mut all = Vec::new();
        for mut s in streams {
            while let Some(ev) = s.next().await {
                all.push(ev?);
            }
        }
        all.sort_by_key(|e| e.time_unix_ns);
        if req.last > 0 && all.len() > req.last as usize {
            all.drain(..all.len() - req.last as usize);
        }
        for ev in &all {
            print_event(&mut out, ev, output)?;
        }
        return Ok(());
    }
    let mut merged = futures::stream::select_all(streams);
    while let Some(ev) = merged.next().await {
        print_event(&mut out, &ev?, output)?;
        out.flush()?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
