//! `sluice-agent`: the Sluice node agent.
//!
//! Standalone mode: reads the node config (and the manifests it names), starts the workers,
//! attaches the datapath, re-attaches the pods of its registry, and serves the local API on its
//! unix socket until SIGTERM or SIGINT, then shuts down cleanly (workers stopped, XDP detached,
//! pins and socket removed). Counters are written to `<state>/counters.json` every second.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use sluice_dataplane::agent::config::NodeConfig;
use sluice_dataplane::agent::datapath::{ControlOnly, Datapath, Unavailable};
use sluice_dataplane::agent::workers::{NoIo, WorkerIo};
use sluice_dataplane::agent::{Agent, api};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Parser)]
#[command(name = "sluice-agent", version, about = "The Sluice node agent")]
struct Args {
    /// Node config file (YAML, or JSON when it ends in .json).
    #[arg(long, short, env = "SLUICE_AGENT_CONFIG")]
    config: PathBuf,
    /// Override the agent socket path.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Override the state directory.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Override the bpffs root (objects are pinned in <root>/<node name>).
    #[arg(long)]
    bpf_root: Option<PathBuf>,
    /// Do not pin workers to cores.
    #[arg(long)]
    no_pin: bool,
    /// Run the control path only (API, registry, tables): attach nothing. Status stays not ready.
    #[arg(long)]
    no_datapath: bool,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut config = NodeConfig::load(&args.config)?;
    if let Some(s) = args.socket {
        config.paths.socket = s;
    }
    if let Some(s) = args.state_dir {
        config.paths.state_dir = s;
    }
    if let Some(s) = args.bpf_root {
        config.paths.bpf_root = s;
    }
    if args.no_pin {
        config.workers.pin = false;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(run(config, args.no_datapath))
}

async fn run(config: NodeConfig, no_datapath: bool) -> anyhow::Result<()> {
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let datapath: Arc<dyn Datapath> = if no_datapath {
        Arc::new(ControlOnly)
    } else {
        Arc::new(Unavailable)
    };
    let io = |_id: usize| -> Box<dyn WorkerIo> { Box::new(NoIo::default()) };
    let socket = config.paths.socket.clone();
    let listener = api::bind(&socket)?;
    let agent = Arc::new(Agent::start(config, datapath, &io).await?);
    match agent.status() {
        Ok(()) => {
            tracing::info!(node = %agent.config.node_name, socket = %socket.display(), "ready")
        }
        Err(why) => {
            tracing::warn!(node = %agent.config.node_name, socket = %socket.display(), "serving, not ready: {why}")
        }
    }

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(api::serve(agent.clone(), listener, socket, async {
        let _ = stop_rx.await;
    }));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = tick.tick() => agent.export_counters().await,
        }
    }
    tracing::info!("shutting down");
    let _ = stop_tx.send(());
    // Give open connections a moment to finish, then stop serving regardless.
    match tokio::time::timeout(Duration::from_secs(2), server).await {
        Ok(r) => r??,
        Err(_) => tracing::warn!("clients still connected at shutdown; closing"),
    }
    let _ = std::fs::remove_file(&agent.config.paths.socket);
    agent.shutdown().await;
    Ok(())
}
