//! Worker threads: each pinned to one core, owning its UMEM and the sockets of the ports assigned to
//! it, running rx batch -> pipeline -> tx batch, and waiting on its socket fds through mio when idle
//! (no spinning unless busy polling is configured).
//!
//! The agent thread talks to a worker only through its command channel (crossbeam) plus a mio
//! `Waker`, so a worker never shares a socket and never takes a lock per packet: attaching a port
//! means asking the owning worker to open the socket on its own UMEM and waiting for its answer.
//! Tables arrive through [`Publisher::load`] between batches.
//!
//! Cross-worker handoff: a frame whose connection another worker owns (`sluice_dataplane::steer`), or whose
//! verdict names a port only another worker has a socket on, is copied to that worker through the
//! lock-free rings of [`super::handoff`]; producers wake the peer's [`Waker`] once per batch. On an
//! interface with at least as many queues as workers, worker `q` owns the socket of queue `q`, so
//! every worker transmits on that port from its own UMEM. The I/O itself sits behind
//! [`WorkerIo`], implemented over `sluice-xdp` in `xsk_io`.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use tokio::sync::oneshot;

use super::counters::WorkerCounters;
use super::handoff::Handoff;
use super::tables::{PortId, Publisher, Snapshot};
use super::trace::{TraceJob, TraceRun};
use sluice_dataplane::conntrack::CtConfig;
use sluice_dataplane::pipeline::{WorkerConfig, WorkerState};

/// What a worker must open a socket on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    pub port: PortId,
    pub ifname: String,
    /// Rx queue of the interface this socket binds to.
    pub queue: u32,
    pub kind: PortKind,
}

/// What a socket is for (it decides how many UMEM chunks wait in its fill ring).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortKind {
    /// The node's uplink: most traffic, a full fill ring.
    Uplink,
    /// A pod's host veth: a share of the UMEM, so that many pods fit on one worker.
    Pod,
    /// Transmit only (the punt link): no fill ring entries.
    Punt,
}

/// A worker could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot set up the worker's UMEM: {0}")]
    Umem(#[source] sluice_xdp::XskError),
    #[error("cannot open an AF_XDP socket on {ifname} queue {queue}: {source}")]
    Open {
        ifname: String,
        queue: u32,
        #[source]
        source: sluice_xdp::XskError,
    },
    #[error("cannot register the AF_XDP socket of {ifname} queue {queue}: {source}")]
    Register {
        ifname: String,
        queue: u32,
        #[source]
        source: super::datapath::DatapathError,
    },
    #[error("worker {0} has stopped")]
    Stopped(usize),
}

/// What one round of a worker's frame I/O did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Frames handled: received, or taken from other workers.
    pub handled: usize,
    /// Frames forwarded to a pod of this node (not to the uplink).
    pub to_pods: usize,
}

/// The frame I/O a worker drives (AF_XDP over sluice-xdp in production).
pub trait WorkerIo: Send {
    /// Open a socket for `spec` on this worker's UMEM; returns its fd to wait on.
    fn open_port(&mut self, spec: &PortSpec) -> Result<RawFd, WorkerError>;
    /// Close the socket of `port` (unknown ports are ignored).
    fn close_port(&mut self, port: PortId);
    /// One round: receive up to a batch per port, run the pipeline, transmit. Returns what it
    /// did (no frame handled means idle).
    fn poll_once(&mut self, tables: &Snapshot, counters: &WorkerCounters) -> Round;
    /// This worker's ends of the handoff rings (called once, before the worker starts, when the
    /// node has several workers). Frame I/O without handoff ignores it.
    fn attach_handoff(&mut self, _handoff: Handoff) {}
    /// Trace `job` over this worker's state, read-only (see [`super::trace`]). Frame I/O without
    /// a pipeline of its own traces over an empty state (no connection tracked).
    fn trace(&mut self, worker: usize, tables: &Snapshot, job: &TraceJob) -> TraceRun {
        let state = WorkerState::new(WorkerConfig {
            conntrack: CtConfig::with_capacity(64),
            affinity_capacity: 64,
        });
        super::trace::run(worker, tables, &state, 0, job)
    }
}

/// Frame I/O that opens nothing: the agent runs its control path (API, registry, tables) without a
/// datapath, e.g. before `sluice-xdp` is available or in control-path tests.
#[derive(Debug, Default)]
pub struct NoIo {
    pub ports: Vec<PortSpec>,
}

impl WorkerIo for NoIo {
    fn open_port(&mut self, spec: &PortSpec) -> Result<RawFd, WorkerError> {
        self.ports.push(spec.clone());
        Ok(-1)
    }
    fn close_port(&mut self, port: PortId) {
        self.ports.retain(|p| p.port != port);
    }
    fn poll_once(&mut self, _: &Snapshot, _: &WorkerCounters) -> Round {
        Round::default()
    }
}

enum Command {
    Open(PortSpec, oneshot::Sender<Result<(), WorkerError>>),
    Close(PortId, oneshot::Sender<()>),
    Trace(Box<TraceJob>, oneshot::Sender<TraceRun>),
    Stop,
}

/// The agent's handle on one worker.
#[derive(Debug)]
pub struct Worker {
    pub id: usize,
    pub core: Option<usize>,
    pub counters: Arc<WorkerCounters>,
    tx: Sender<Command>,
    waker: Arc<Waker>,
    join: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Open(s, _) => write!(f, "Open({s:?})"),
            Self::Close(p, _) => write!(f, "Close({p:?})"),
            Self::Trace(j, _) => write!(f, "Trace({:?}, {} bytes)", j.ingress, j.frame.len()),
            Self::Stop => write!(f, "Stop"),
        }
    }
}

const WAKER: Token = Token(usize::MAX);

/// How a worker runs.
#[derive(Debug, Clone, Copy)]
pub struct WorkerParams {
    pub id: usize,
    /// Core to pin to (`None`: not pinned).
    pub core: Option<usize>,
    pub busy_poll: bool,
    /// Keep polling this long after a busy round before sleeping (see the node config).
    pub idle_spin: Duration,
    /// Give the core to any other runnable thread after a round that forwarded frames to a pod
    /// of this node (see the node config's `yield_to_pods`).
    pub yield_to_pods: bool,
    /// The worker thread's time slice under the fair scheduler (see the node config's
    /// `slice_us`); `None` keeps the kernel's default.
    pub slice: Option<Duration>,
}

impl Worker {
    /// Start a worker thread driving `io`.
    pub fn spawn(
        params: WorkerParams,
        io: Box<dyn WorkerIo>,
        tables: Publisher,
    ) -> std::io::Result<Self> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, rx) = crossbeam_channel::unbounded();
        let counters = Arc::new(WorkerCounters::default());
        let c = counters.clone();
        let join = std::thread::Builder::new()
            .name(format!("sluice-worker-{}", params.id))
            .spawn(move || run(params, io, tables, rx, poll, c))?;
        Ok(Self {
            id: params.id,
            core: params.core,
            counters,
            tx,
            waker,
            join: std::sync::Mutex::new(Some(join)),
        })
    }

    fn send(&self, cmd: Command) -> Result<(), WorkerError> {
        self.tx
            .send(cmd)
            .map_err(|_| WorkerError::Stopped(self.id))?;
        self.waker.wake().map_err(|_| WorkerError::Stopped(self.id))
    }

    /// Ask the worker to open a socket for `spec`, and wait for its answer.
    pub async fn open_port(&self, spec: PortSpec) -> Result<(), WorkerError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Open(spec, tx))?;
        rx.await.map_err(|_| WorkerError::Stopped(self.id))?
    }

    /// Ask the worker to close the socket of `port`, and wait until it has.
    pub async fn close_port(&self, port: PortId) -> Result<(), WorkerError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Close(port, tx))?;
        rx.await.map_err(|_| WorkerError::Stopped(self.id))
    }

    /// Ask the worker to trace `job` over its state between two batches, and wait for the answer.
    pub async fn trace(&self, job: TraceJob) -> Result<TraceRun, WorkerError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Trace(Box::new(job), tx))?;
        rx.await.map_err(|_| WorkerError::Stopped(self.id))
    }

    /// The waker of the worker's event loop (for handoff producers).
    pub fn waker(&self) -> Arc<Waker> {
        self.waker.clone()
    }

    /// Whether the thread is still running.
    pub fn is_running(&self) -> bool {
        self.join
            .lock()
            .map(|j| j.as_ref().is_some_and(|j| !j.is_finished()))
            .unwrap_or(false)
    }

    /// Stop the worker and wait for it (it closes its sockets on the way out).
    pub fn stop(&self) {
        let _ = self.send(Command::Stop);
        let join = self.join.lock().ok().and_then(|mut j| j.take());
        if let Some(j) = join {
            let _ = j.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn pin_to(core: usize) -> nix::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(core)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
}

/// Ask the fair scheduler for a time slice of `slice` for this thread (EEVDF's custom slice,
/// Linux 6.12 and later: `sched_setattr` with `sched_runtime` on a SCHED_OTHER thread). A short
/// slice lets a pod's application sharing the core run between the worker's deliveries, without
/// the lasting penalty a `sched_yield` costs under EEVDF (each one pushes the caller's deadline a
/// whole slice back).
fn set_slice(slice: Duration) -> std::io::Result<()> {
    // SAFETY: sched_attr is plain data; zeroed is a valid value for every field.
    let mut attr: libc::sched_attr = unsafe { std::mem::zeroed() };
    attr.size = std::mem::size_of::<libc::sched_attr>() as u32;
    attr.sched_policy = libc::SCHED_OTHER as u32;
    attr.sched_runtime = u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX);
    // SAFETY: sched_setattr(2) on the calling thread (pid 0) reads `attr`, which lives across the
    // call and whose `size` says its length; flags 0.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_setattr,
            0,
            &attr as *const libc::sched_attr,
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn run(
    params: WorkerParams,
    mut io: Box<dyn WorkerIo>,
    tables: Publisher,
    rx: Receiver<Command>,
    mut poll: Poll,
    counters: Arc<WorkerCounters>,
) {
    if let Some(core) = params.core
        && let Err(e) = pin_to(core)
    {
        tracing::warn!(worker = params.id, core, "cannot pin worker: {e}");
    }
    if let Some(slice) = params.slice
        && let Err(e) = set_slice(slice)
    {
        tracing::warn!(
            worker = params.id,
            ?slice,
            "cannot set the worker's time slice: {e}"
        );
    }
    let mut events = Events::with_capacity(64);
    let mut fds: Vec<(PortId, RawFd)> = Vec::new();
    let mut tables = tables.reader();
    let mut last_busy = Instant::now();
    loop {
        // Commands first: they are rare and a port change must not wait behind traffic.
        while let Ok(cmd) = rx.try_recv() {
            match cmd {
                Command::Open(spec, reply) => {
                    let r = io.open_port(&spec).map(|fd| {
                        if fd >= 0 {
                            let token = Token(spec.port.0 as usize);
                            if let Err(e) = poll.registry().register(
                                &mut SourceFd(&fd),
                                token,
                                Interest::READABLE,
                            ) {
                                tracing::warn!(port = spec.port.0, "cannot wait on socket: {e}");
                            }
                            fds.push((spec.port, fd));
                        }
                    });
                    let _ = reply.send(r);
                }
                Command::Close(port, reply) => {
                    if let Some(i) = fds.iter().position(|(p, _)| *p == port) {
                        let (_, fd) = fds.swap_remove(i);
                        let _ = poll.registry().deregister(&mut SourceFd(&fd));
                    }
                    io.close_port(port);
                    let _ = reply.send(());
                }
                Command::Trace(job, reply) => {
                    let _ = reply.send(io.trace(params.id, tables.current(), &job));
                }
                Command::Stop => {
                    for (port, fd) in fds.drain(..) {
                        let _ = poll.registry().deregister(&mut SourceFd(&fd));
                        io.close_port(port);
                    }
                    return;
                }
            }
        }
        let Round { handled, to_pods } = io.poll_once(tables.current(), &counters);
        if handled > 0 {
            last_busy = Instant::now();
            if params.yield_to_pods && to_pods > 0 {
                // One sched_yield per round, not per frame: see `WorkerParams::yield_to_pods`.
                std::thread::yield_now();
            }
        } else if !params.idle_spin.is_zero() && last_busy.elapsed() < params.idle_spin {
            std::hint::spin_loop();
            continue;
        }
        if handled == 0 && !params.busy_poll {
            // Idle: sleep until a socket is readable or a command arrives. The timeout bounds how
            // long TX completions and fill refills can wait when nothing else happens.
            let _ = poll.poll(&mut events, Some(Duration::from_millis(10)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NodeConfig;
    use crate::manifests::ClusterObjects;

    #[test]
    fn set_slice_sets_the_threads_fair_slice() {
        let runtime = std::thread::spawn(|| {
            set_slice(Duration::from_micros(100)).unwrap();
            // SAFETY: as in set_slice; sched_getattr(2) writes at most `size` bytes into `attr`.
            let mut attr: libc::sched_attr = unsafe { std::mem::zeroed() };
            let size = std::mem::size_of::<libc::sched_attr>() as u32;
            // SAFETY: the calling thread's attributes into `attr`, `size` bytes long; flags 0.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_sched_getattr,
                    0,
                    &mut attr as *mut libc::sched_attr,
                    size,
                    0,
                )
            };
            assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
            (attr.sched_policy, attr.sched_runtime)
        })
        .join()
        .unwrap();
        assert_eq!(runtime, (libc::SCHED_OTHER as u32, 100_000));
    }

    fn snapshot(generation: u64) -> Snapshot {
        let config: NodeConfig = serde_saphyr::from_str(
            "node_name: a\nunderlay: {interface: up0, address: 192.168.1.1}\npod_cidr: 10.244.1.0/24\nvtep: {mac: \"0e:00:00:00:01:00\"}\n",
        )
        .unwrap();
        Snapshot::build(
            generation,
            &config,
            crate::tables::tests::LINKS,
            &ClusterObjects::default(),
            [],
        )
        .unwrap()
    }

    fn publisher() -> Publisher {
        Publisher::new(snapshot(1))
    }

    #[test]
    fn a_reader_keeps_its_snapshot_until_a_new_one_is_published() {
        let p = publisher();
        let mut r = p.reader();
        let first = r.current().clone();
        assert_eq!(first.generation, 1);
        assert!(Arc::ptr_eq(r.current(), &first), "unchanged: the same Arc");
        p.publish(snapshot(2));
        assert_eq!(r.current().generation, 2);
        assert!(!Arc::ptr_eq(r.current(), &first));
        assert_eq!(p.generation(), 2);
    }

    #[tokio::test]
    async fn commands_reach_the_worker_and_stop_joins() {
        let w = Worker::spawn(
            WorkerParams {
                id: 0,
                core: None,
                busy_poll: false,
                idle_spin: Duration::ZERO,
                yield_to_pods: true,
                slice: None,
            },
            Box::new(NoIo::default()),
            publisher(),
        )
        .unwrap();
        assert!(w.is_running());
        let spec = PortSpec {
            port: PortId(9),
            ifname: "veth9".into(),
            queue: 0,
            kind: PortKind::Pod,
        };
        w.open_port(spec).await.unwrap();
        w.close_port(PortId(9)).await.unwrap();
        w.stop();
        assert!(!w.is_running());
        assert!(matches!(
            w.open_port(PortSpec {
                port: PortId(1),
                ifname: "x".into(),
                queue: 0,
                kind: PortKind::Pod,
            })
            .await,
            Err(WorkerError::Stopped(0))
        ));
    }

    #[test]
    fn errors_say_where_and_keep_their_source() {
        use std::error::Error;
        let e = WorkerError::Register {
            ifname: "vp0".into(),
            queue: 1,
            source: crate::datapath::DatapathError::NotLoaded {
                what: "register an AF_XDP socket",
                ifname: "vp0".into(),
            },
        };
        assert_eq!(
            e.to_string(),
            "cannot register the AF_XDP socket of vp0 queue 1: cannot register an AF_XDP socket on vp0: the XDP program is not loaded"
        );
        assert!(
            e.source()
                .is_some_and(|s| s.to_string().contains("not loaded"))
        );
    }
}
