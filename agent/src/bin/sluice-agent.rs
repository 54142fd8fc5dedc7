//! `sluice-agent`: the Sluice node agent.
//!
//! Standalone mode: reads the node config (and the manifests it names), starts the workers,
//! attaches the datapath, re-attaches the pods of its registry, and serves the local API on its
//! unix socket until SIGTERM or SIGINT, then shuts down cleanly (workers stopped, XDP detached,
//! pins and socket removed). SIGHUP re-reads the manifests. Counters are written to
//! `<state>/counters.json` every second.
//!
//! Control-plane mode (the config has a `control` section, see `agent::control_sync`): the agent
//! registers with `sluice-control` (the lease is its pod CIDR), follows its watch into the tables
//! on top of any manifests, reports its pods and the revision it runs; it keeps serving with what
//! it has while the control plane is unreachable.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use sluice_agent::config::BindMode;
use sluice_agent::config::NodeConfig;
use sluice_agent::datapath::{ControlOnly, Datapath, XdpDatapath};
use sluice_agent::workers::{NoIo, WorkerError, WorkerIo};
use sluice_agent::xsk_io::XskIo;
use sluice_agent::{Agent, PortSet, api, control_sync};
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
    /// Override the bpffs mount point (objects are pinned in <bpffs>/sluice/<node name>).
    #[arg(long)]
    bpffs: Option<PathBuf>,
    /// Do not pin workers to cores.
    #[arg(long)]
    no_pin: bool,
    /// Run the control path only (API, registry, tables): attach nothing. Status stays not ready.
    #[arg(long)]
    no_datapath: bool,
    /// Attach XDP in generic (SKB) mode instead of native (the explicit fallback).
    #[arg(long)]
    generic_xdp: bool,
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
    if let Some(s) = args.bpffs {
        config.paths.bpffs = s;
    }
    if args.no_pin {
        config.workers.pin = false;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(run(config, args.no_datapath, args.generic_xdp))
}

async fn run(mut config: NodeConfig, no_datapath: bool, generic_xdp: bool) -> anyhow::Result<()> {
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let ports = PortSet::default();
    let umem = sluice_agent::xsk_io::UmemPlan::for_pods(config.max_pods);
    tracing::info!(
        chunks = umem.frames,
        mib = umem.bytes() >> 20,
        max_pods = config.max_pods,
        "each worker's UMEM"
    );
    let xsk_config = sluice_xdp::XskConfig {
        frame_count: umem.frames,
        frame_size: sluice_agent::xsk_io::CHUNK,
        fill_size: sluice_agent::xsk_io::FILL_RING,
        fill_boost: umem.fill_boost,
        batch_size: config.workers.batch_size as usize,
        bind_mode: match config.workers.bind_mode {
            BindMode::Copy => sluice_xdp::BindMode::Copy,
            BindMode::ZeroCopy => sluice_xdp::BindMode::ZeroCopy,
        },
        busy_poll: config.workers.busy_poll.then_some(sluice_xdp::BusyPoll {
            usecs: 20,
            budget: config.workers.batch_size,
        }),
        // More than the kernel's 32 frames per transmit kick where it allows (Linux 6.17+): the
        // 47 pieces of one cut 64 KiB frame leave in one sendto.
        tx_skb_budget: Some(256),
        ..Default::default()
    };
    let (datapath, io): (Arc<dyn Datapath>, Box<sluice_agent::IoFactory>) = if no_datapath {
        (
            Arc::new(ControlOnly),
            Box::new(|_| Ok(Box::new(NoIo::default()) as Box<dyn WorkerIo>)),
        )
    } else {
        let xdp = XdpDatapath::new(generic_xdp);
        let loader = xdp.loader();
        let ports = ports.clone();
        (
            Arc::new(xdp),
            Box::new(move |_| -> Result<Box<dyn WorkerIo>, WorkerError> {
                Ok(Box::new(XskIo::new(
                    &xsk_config,
                    loader.clone(),
                    ports.clone(),
                )?))
            }),
        )
    };
    let socket = config.paths.socket.clone();
    let listener = api::bind(&socket)?;
    // Control-plane mode: register (the lease fills in the pod CIDR) before starting.
    let registered = control_sync::register(&mut config).await?;
    let agent = Arc::new(Agent::start(config, datapath, &*io, ports).await?);
    let control = control_sync::spawn(agent.clone(), registered);
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
    let drain = tokio::spawn(sluice_agent::events::run(agent.clone()));
    if let Some(addr) = agent.config.metrics_listen {
        let a = agent.clone();
        tokio::spawn(async move {
            if let Err(e) = sluice_agent::metrics::serve(a, addr).await {
                tracing::warn!(%addr, "metrics server stopped: {e}");
            }
        });
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = tick.tick() => agent.export_counters().await,
            _ = sighup.recv() => match agent.reload_manifests().await {
                Ok(()) => tracing::info!("manifests reloaded"),
                Err(e) => tracing::warn!("manifests not reloaded, keeping the current ones: {e}"),
            },
        }
    }
    tracing::info!("shutting down");
    if let Some(c) = &control {
        c.abort();
    }
    drain.abort();
    let _ = stop_tx.send(());
    // Give open connections a moment to finish, then stop serving regardless.
    match tokio::time::timeout(Duration::from_secs(2), server).await {
        Ok(r) => r??,
        Err(_) => tracing::warn!("clients still connected at shutdown; closing"),
    }
    let _ = std::fs::remove_file(&agent.config.paths.socket);
    agent.shutdown().await;
    tracing::info!("stopped cleanly: workers stopped, XDP detached, pins and socket removed");
    Ok(())
}
