//! `sluice-control`: the control plane server.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use sluice_control::auth::{Authenticator, TokenTable};
use sluice_control::metrics::ControlRegistry;
use sluice_control::server::kube::KubeSource;
use sluice_control::server::{ControlService, ServerConfig, ServerTls, serve_counted};
use sluice_control::store::{AnyStore, EtcdStore, EtcdTls, RedbStore};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Backend {
    /// Embedded, crash-safe (redb) under --data-dir.
    Redb,
    /// etcd v3 at --etcd-endpoints; several replicas may share it.
    Etcd,
}

/// Sluice's control plane: stores nodes, pods, services, endpoints and policies, leases pod CIDRs,
/// allocates ClusterIPs and NodePorts, and streams every change to the node agents.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Examples:\n  \
  sluice-control --listen 0.0.0.0:7443 --tls-cert server.pem --tls-key server.key --tokens tokens.txt\n  \
  sluice-control --store etcd --etcd-endpoints http://10.0.0.5:2379 --tls-cert server.pem --tls-key server.key --tokens tokens.txt\n  \
  sluice-control --store etcd --etcd-endpoints https://10.0.0.5:2379 --etcd-cacert etcd-ca.pem --etcd-cert etcd-client.pem --etcd-key etcd-client.key --tls-cert server.pem --tls-key server.key --tokens tokens.txt\n  \
  sluice-control --listen 127.0.0.1:7443 --insecure-plaintext --data-dir /tmp/sluice   # development only\n  \
  sluice-control --kubernetes --listen 0.0.0.0:7443 --tls-cert ... --tls-key ... --tokens ...   # in a pod (deploy/sluice.yaml)\n\n\
The tokens file has lines \"<operator|node> <name> <token>\"; see control/README.md."
)]
#[command(args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Address to listen on (port 0 picks a free port; the bound address is printed on stdout).
    #[arg(long, default_value = "127.0.0.1:7443")]
    listen: String,
    #[arg(long, value_enum, default_value = "redb")]
    store: Backend,
    /// State directory of the embedded store.
    #[arg(long, default_value = "/var/lib/sluice/control")]
    data_dir: PathBuf,
    /// etcd endpoints, comma separated (https:// ones with --etcd-cacert).
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    etcd_endpoints: Vec<String>,
    /// CA certificate (PEM) that signed etcd's serving certificate (etcdctl's --cacert).
    #[arg(long)]
    etcd_cacert: Option<PathBuf>,
    /// Client certificate (PEM) for an etcd run with --client-cert-auth (etcdctl's --cert).
    #[arg(long, requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    /// Key (PEM) of --etcd-cert (etcdctl's --key).
    #[arg(long, requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// Server certificate chain (PEM).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Bearer tokens file.
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// Serve without TLS (loopback addresses only). Without --tokens, every caller is an operator.
    #[arg(long)]
    insecure_plaintext: bool,
    #[arg(long, default_value = "10.244.0.0/16")]
    cluster_cidr: ipnet::Ipv4Net,
    /// Prefix length of each node's pod CIDR.
    #[arg(long, default_value_t = 24)]
    node_cidr_prefix: u8,
    #[arg(long, default_value = "10.96.0.0/12")]
    service_cidr: ipnet::Ipv4Net,
    /// NodePort range, e.g. 30000-32767.
    #[arg(long, default_value = "30000-32767")]
    node_port_range: String,
    /// Revisions of history kept by the embedded store for watchers that fall behind.
    #[arg(long, default_value_t = sluice_control::store::redb_history_default())]
    history: u64,
    /// Serve Prometheus metrics (GET /metrics) on this address, e.g. 127.0.0.1:9479.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Follow the Kubernetes API server of this kubeconfig (its current context): Namespaces,
    /// Nodes, Pods, Services, EndpointSlices and NetworkPolicies come from it, not from
    /// `sluicectl apply`.
    #[arg(long, conflicts_with = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// Follow the Kubernetes API server of the pod this runs in (in-cluster service account), or
    /// of $KUBECONFIG / ~/.kube/config outside a cluster.
    #[arg(long)]
    kubernetes: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Prepare a node (the init container of deploy/sluice.yaml's DaemonSet, host paths mounted):
    /// install the CNI plugin, write the CNI conflist, and write the agent's config from a
    /// template with ${NODE_NAME}, ${NODE_IP}, ${UNDERLAY_INTERFACE} (the interface of the most
    /// specific directly connected route to NODE_IP, unless set) and ${VTEP_MAC} (0e:53 and the
    /// node IP's four bytes, unless set) taken from the environment.
    InstallNode(InstallNode),
}

#[derive(Debug, clap::Args)]
struct InstallNode {
    /// The CNI plugin binary to install.
    #[arg(long, default_value = "/usr/bin/sluice-cni")]
    cni_plugin: PathBuf,
    /// Where the plugin goes (the host's /opt/cni/bin, mounted).
    #[arg(long, default_value = "/host/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// The conflist to install, as is.
    #[arg(long)]
    conflist: PathBuf,
    /// Where it goes (the host's /etc/cni/net.d/10-sluice.conflist, mounted).
    #[arg(long, default_value = "/host/etc/cni/net.d/10-sluice.conflist")]
    conflist_out: PathBuf,
    /// The agent config template.
    #[arg(long)]
    agent_config: PathBuf,
    /// Where the rendered agent config goes.
    #[arg(long, default_value = "/run/sluice/agent.yaml")]
    agent_config_out: PathBuf,
    /// The routing table to find the underlay interface in.
    #[arg(long, default_value = "/proc/net/route")]
    routes: PathBuf,
}

/// Write `bytes` to `path` through a temporary file and a rename (a reader never sees half).
fn write_atomic(path: &std::path::Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().context("a path with a directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("sluice")
    ));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

/// The interface of the most specific gateway-less route in `/proc/net/route` holding `ip`.
fn route_interface(table: &str, ip: std::net::Ipv4Addr) -> Option<String> {
    // The kernel prints each address as the hex of its network-order bytes read as a native u32.
    let hex = |s: &str| {
        u32::from_str_radix(s, 16)
            .ok()
            .map(|v| u32::from_be_bytes(v.to_ne_bytes()))
    };
    let ip = u32::from_be_bytes(ip.octets());
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (dest, gw, mask) = (hex(f.get(1)?)?, hex(f.get(2)?)?, hex(f.get(7)?)?);
            (gw == 0 && mask != 0 && ip & mask == dest)
                .then(|| (mask.count_ones(), f[0].to_string()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, name)| name)
}

/// Replace every `${NAME}` of `vars` in `template`; an unknown `${...}` is an error.
fn render(template: &str, vars: &[(&str, String)]) -> anyhow::Result<String> {
    let mut out = template.to_string();
    for (k, v) in vars {
        out = out.replace(&format!("${{{k}}}"), v);
    }
    if let Some(at) = out.find("${") {
        let name: String = out[at..].chars().take_while(|c| *c != '}').collect();
        bail!("the agent config template uses {name}}}, which is not set");
    }
    Ok(out)
}

fn install_node(a: &InstallNode) -> anyhow::Result<()> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let node =
        env("NODE_NAME").context("NODE_NAME is not set (the downward API's spec.nodeName)")?;
    let ip: std::net::Ipv4Addr = env("NODE_IP")
        .context("NODE_IP is not set (the downward API's status.hostIP)")?
        .parse()
        .context("NODE_IP is not an IPv4 address")?;
    let interface = match env("UNDERLAY_INTERFACE") {
        Some(i) => i,
        None => {
            let table = std::fs::read_to_string(&a.routes)
                .with_context(|| format!("reading {}", a.routes.display()))?;
            route_interface(&table, ip)
                .with_context(|| format!("no connected route holds {ip}; set UNDERLAY_INTERFACE"))?
        }
    };
    let o = ip.octets();
    let mac = env("VTEP_MAC")
        .unwrap_or_else(|| format!("0e:53:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]));
    let template = std::fs::read_to_string(&a.agent_config)
        .with_context(|| format!("reading {}", a.agent_config.display()))?;
    let config = render(
        &template,
        &[
            ("NODE_NAME", node.clone()),
            ("NODE_IP", ip.to_string()),
            ("UNDERLAY_INTERFACE", interface.clone()),
            ("VTEP_MAC", mac.clone()),
        ],
    )?;
    let plugin = std::fs::read(&a.cni_plugin)
        .with_context(|| format!("reading {}", a.cni_plugin.display()))?;
    write_atomic(&a.cni_bin_dir.join("sluice-cni"), &plugin, 0o755)?;
    let conflist =
        std::fs::read(&a.conflist).with_context(|| format!("reading {}", a.conflist.display()))?;
    serde_json::from_slice::<serde_json::Value>(&conflist)
        .with_context(|| format!("{} is not JSON", a.conflist.display()))?;
    write_atomic(&a.conflist_out, &conflist, 0o644)?;
    write_atomic(&a.agent_config_out, config.as_bytes(), 0o600)?;
    println!(
        "node {node}: installed {}, {}, {} (underlay {interface} {ip}, VTEP MAC {mac})",
        a.cni_bin_dir.join("sluice-cni").display(),
        a.conflist_out.display(),
        a.agent_config_out.display()
    );
    Ok(())
}

/// The API server to follow, if any.
async fn kube_client(args: &Args) -> anyhow::Result<Option<kube::Client>> {
    let config = match (&args.kubeconfig, args.kubernetes) {
        (Some(path), _) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("using the kubeconfig {}", path.display()))?
        }
        (None, true) => kube::Config::infer()
            .await
            .context("no in-cluster service account, $KUBECONFIG or ~/.kube/config")?,
        (None, false) => return Ok(None),
    };
    let url = config.cluster_url.clone();
    let client = kube::Client::try_from(config).context("building the Kubernetes client")?;
    tracing::info!(%url, "following the Kubernetes API server");
    Ok(Some(client))
}

/// Arenas glibc's malloc may create (see [`limit_malloc_arenas`]).
const MALLOC_ARENAS: i32 = 1;

/// Caps glibc's malloc arenas at [`MALLOC_ARENAS`] unless the operator set `MALLOC_ARENA_MAX`.
/// By default every thread that contends gets an arena of its own (up to eight per core), and the
/// control plane's flow events are allocated on one runtime thread and freed on another: under
/// the churn soak (`scripts/soak.sh`, every history full) the resident memory then kept growing,
/// about 0.5 MB a minute (two arenas: +11 % in 3 minutes; one: flat). Threads still allocate
/// without the arena's lock from their own small caches (glibc's tcache). See control/README.md,
/// "Memory".
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    // SAFETY: mallopt sets one of glibc's allocator tunables, with no pointer argument; it runs
    // before the runtime starts any thread.
    let ok = unsafe { libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS) };
    if ok != 1 {
        eprintln!("sluice-control: mallopt(M_ARENA_MAX) refused; malloc keeps its default arenas");
    }
}

fn main() -> anyhow::Result<()> {
    limit_malloc_arenas();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(serve_main())
}

async fn serve_main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let Some(Command::InstallNode(a)) = &args.command {
        return install_node(a);
    }
    let (lo, hi) = args
        .node_port_range
        .split_once('-')
        .and_then(|(a, b)| Some((a.parse::<u16>().ok()?, b.parse::<u16>().ok()?)))
        .filter(|(a, b)| a <= b)
        .context("--node-port-range must look like 30000-32767")?;
    if args.node_cidr_prefix < args.cluster_cidr.prefix_len() || args.node_cidr_prefix > 30 {
        bail!(
            "--node-cidr-prefix {} does not fit in {}",
            args.node_cidr_prefix,
            args.cluster_cidr
        );
    }
    let cfg = ServerConfig {
        cluster_cidr: args.cluster_cidr,
        node_prefix: args.node_cidr_prefix,
        service_cidr: args.service_cidr,
        node_ports: (lo, hi),
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(ServerTls {
            cert_pem: std::fs::read(c).with_context(|| format!("reading {}", c.display()))?,
            key_pem: std::fs::read(k).with_context(|| format!("reading {}", k.display()))?,
        }),
        _ if args.insecure_plaintext => None,
        _ => bail!(
            "--tls-cert and --tls-key are required (or --insecure-plaintext on a loopback address)"
        ),
    };
    let auth = match &args.tokens {
        Some(p) => Authenticator::new(TokenTable::load(p)?),
        None if args.insecure_plaintext => Authenticator::insecure_anonymous(),
        None => bail!(
            "--tokens is required (or --insecure-plaintext for an unauthenticated development server)"
        ),
    };
    let store = match args.store {
        Backend::Redb => AnyStore::Redb(
            RedbStore::open_with_history(&args.data_dir, args.history)
                .with_context(|| format!("opening the store in {}", args.data_dir.display()))?,
        ),
        Backend::Etcd => AnyStore::Etcd(Box::new(
            EtcdStore::connect(
                &args.etcd_endpoints,
                &EtcdTls {
                    ca: args.etcd_cacert.clone(),
                    cert: args.etcd_cert.clone(),
                    key: args.etcd_key.clone(),
                },
            )
            .await
            .context("connecting to etcd")?,
        )),
    };
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    println!("sluice-control listening on {addr}");
    tracing::info!(%addr, store = ?args.store, tls = tls.is_some(), "serving");
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
        }
    };
    let mut service = ControlService::new(store, cfg);
    if let Some(client) = kube_client(&args).await? {
        let (source, link) = KubeSource::new(client);
        service = service.following(link);
        tokio::spawn(source.run(service.clone()));
    }
    let counts = std::sync::Arc::new(sluice_control::metrics::RequestCounts::default());
    if let Some(maddr) = args.metrics_listen {
        let registry = std::sync::Arc::new(ControlRegistry::new(counts.clone()));
        let svc = service.clone();
        let render = move || {
            let (svc, registry) = (svc.clone(), registry.clone());
            async move {
                let m = svc.metrics_snapshot().await.unwrap_or_else(|e| {
                    tracing::warn!("metrics: cannot read the store: {e}");
                    Default::default()
                });
                registry.render(m)
            }
        };
        tracing::info!(addr = %maddr, "metrics");
        tokio::spawn(async move {
            if let Err(e) = sluice_control::metrics::serve_http(maddr, render).await {
                tracing::warn!("metrics server on {maddr} stopped: {e}");
            }
        });
    }
    serve_counted(listener, service, auth, tls, shutdown, counts).await?;
    tracing::info!("stopped cleanly: serving ended, connections closed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_interface_takes_the_most_specific_connected_route() {
        // 10.0.0.0/8 via eth1, 192.168.1.0/24 on eth0, default via 192.168.1.1 on eth0.
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
            eth0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
            eth1\t0000000A\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0\n";
        let ip = |s: &str| s.parse().unwrap();
        assert_eq!(
            route_interface(table, ip("192.168.1.7")).as_deref(),
            Some("eth0")
        );
        assert_eq!(
            route_interface(table, ip("10.1.2.3")).as_deref(),
            Some("eth1")
        );
        assert_eq!(route_interface(table, ip("172.16.0.1")), None);
        assert_eq!(route_interface("garbage\nx y", ip("10.1.2.3")), None);
    }

    #[test]
    fn render_fills_every_variable_or_says_which_is_missing() {
        let vars = [("NODE_NAME", "n1".to_string())];
        assert_eq!(
            render("node_name: ${NODE_NAME}\n", &vars).unwrap(),
            "node_name: n1\n"
        );
        let e = render("a: ${NODE_IP}", &vars).unwrap_err().to_string();
        assert!(e.contains("${NODE_IP}"), "{e}");
    }
}
