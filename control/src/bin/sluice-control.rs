//! `sluice-control`: the control plane server.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use sluice_control::auth::{Authenticator, TokenTable};
use sluice_control::metrics::ControlRegistry;
use sluice_control::server::kube::KubeSource;
use sluice_control::server::{ControlService, ServerConfig, ServerTls, serve_counted};
use sluice_control::store::{AnyStore, EtcdStore, RedbStore};

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
  sluice-control --listen 127.0.0.1:7443 --insecure-plaintext --data-dir /tmp/sluice   # development only\n  \
  sluice-control --kubernetes --listen 0.0.0.0:7443 --tls-cert ... --tls-key ... --tokens ...   # in a pod (deploy/sluice.yaml)\n\n\
The tokens file has lines \"<operator|node> <name> <token>\"; see control/README.md."
)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the bound address is printed on stdout).
    #[arg(long, default_value = "127.0.0.1:7443")]
    listen: String,
    #[arg(long, value_enum, default_value = "redb")]
    store: Backend,
    /// State directory of the embedded store.
    #[arg(long, default_value = "/var/lib/sluice/control")]
    data_dir: PathBuf,
    /// etcd endpoints, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    etcd_endpoints: Vec<String>,
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
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
            EtcdStore::connect(&args.etcd_endpoints)
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
