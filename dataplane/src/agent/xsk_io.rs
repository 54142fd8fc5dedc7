//! A worker's frame I/O over `sluice-xdp`: one UMEM ([`Xsk`]) shared by the sockets this worker
//! owns, rx batch -> [`crate::pipeline::process`] -> tx batch.
//!
//! Forwarding between two sockets of this worker moves the descriptor (no copy). A verdict naming
//! a port whose socket another worker owns is a cross-worker handoff: `sluice-xdp` has no call to
//! transmit a copied frame on a socket yet, so such frames are dropped and counted as
//! `handoff_unsupported` (and in `handoffs`); with one worker per node (the default for a
//! single-queue uplink) it never happens. `PassToKernel` after a redirect goes back to the kernel
//! through the punt link (`punt`): counted in `to_kernel`, and as drop `pass_after_redirect` when
//! there is no punt link.
//!
//! Multi-buffer frames: the pipeline reads the continuation chunks in place as the frame's
//! read-only tail ([`sluice_xdp::FrameMut::split_tail`], no copy); headers are always in the first
//! chunk, and the descriptors are forwarded unchanged, chained. A packet of more than
//! [`MAX_TAIL`] continuation chunks (the kernel makes at most 17) is dropped and counted.

use std::os::fd::AsRawFd;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::time::Instant;

use sluice_xdp::{RxBatch, SocketId, Xsk, XskConfig};

use super::PortSet;
use super::counters::WorkerCounters;
use super::datapath::{SharedLoader, agent_drop};
use super::tables::{PortId, Snapshot};
use super::workers::{PortKind, PortSpec, WorkerError, WorkerIo};
use crate::frame::Frame;
use crate::pipeline::{WorkerConfig, WorkerState, process};
use crate::verdict::{self, Verdict};

/// Continuation chunks a packet may have (a 64 KiB packet in 4 KiB chunks needs 16; the kernel's
/// limit is 17 fragments).
pub const MAX_TAIL: usize = 32;

/// UMEM chunks kept in a pod socket's fill ring: four batches of MTU-sized frames or about 15
/// 64 KiB ones. The uplink gets a full ring. A worker's UMEM (`frame_count`) then holds the uplink,
/// frames in flight and this many per pod: 16384 chunks serve about 50 pods per worker.
pub const POD_FILL: u32 = 256;

/// One socket of this worker.
#[derive(Debug, Clone, Copy)]
struct OwnedSocket {
    port: PortId,
    queue: u32,
    id: SocketId,
}

/// AF_XDP frame I/O of one worker.
#[derive(Debug)]
pub struct XskIo {
    xsk: Xsk,
    batch: RxBatch,
    sockets: Vec<OwnedSocket>,
    loader: SharedLoader,
    state: WorkerState,
    start: Instant,
    /// Ports some other worker owns (for counting handoffs rather than `no_socket`).
    peers: PortSet,
}

impl XskIo {
    /// A worker's UMEM (`cfg`), registering its sockets through `loader`.
    pub fn new(cfg: &XskConfig, loader: SharedLoader, peers: PortSet) -> Result<Self, WorkerError> {
        let xsk = Xsk::new(cfg).map_err(|e| WorkerError::Open {
            ifname: String::new(),
            queue: 0,
            message: e.to_string(),
        })?;
        let batch = xsk.batch();
        Ok(Self {
            xsk,
            batch,
            sockets: Vec::new(),
            loader,
            state: WorkerState::new(WorkerConfig::default()),
            start: Instant::now(),
            peers,
        })
    }
}

fn open_err(spec: &PortSpec, message: String) -> WorkerError {
    WorkerError::Open {
        ifname: spec.ifname.clone(),
        queue: spec.queue,
        message,
    }
}

impl WorkerIo for XskIo {
    fn open_port(&mut self, spec: &PortSpec) -> Result<RawFd, WorkerError> {
        let fill = match spec.kind {
            PortKind::Uplink => self.xsk.config().fill_size,
            PortKind::Pod => POD_FILL,
            PortKind::Punt => 0,
        };
        let id = self
            .xsk
            .open_socket_with(&spec.ifname, spec.queue, fill)
            .map_err(|e| open_err(spec, e.to_string()))?;
        let fd = self.xsk.fd(id).map_err(|e| open_err(spec, e.to_string()))?;
        let registered = match self.loader.lock() {
            Ok(mut g) => match g.as_mut() {
                Some(l) => l
                    .register_socket(spec.port.0, spec.queue, fd)
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                None => Err("the XDP program is not loaded".to_owned()),
            },
            Err(_) => Err("loader lock poisoned".to_owned()),
        };
        let raw = fd.as_raw_fd();
        if let Err(m) = registered {
            let _ = self.xsk.close_socket(id);
            return Err(open_err(spec, format!("registering in the XSKMAP: {m}")));
        }
        self.sockets.push(OwnedSocket {
            port: spec.port,
            queue: spec.queue,
            id,
        });
        Ok(raw)
    }

    fn close_port(&mut self, port: PortId) {
        let (gone, keep): (Vec<_>, Vec<_>) = self.sockets.iter().partition(|s| s.port == port);
        self.sockets = keep;
        for s in gone {
            if let Ok(mut g) = self.loader.lock()
                && let Some(l) = g.as_mut()
                && let Err(e) = l.unregister_socket(s.port.0, s.queue)
            {
                tracing::warn!(port = s.port.0, "unregistering socket: {e}");
            }
            if let Err(e) = self.xsk.close_socket(s.id) {
                tracing::warn!(port = s.port.0, "closing socket: {e}");
            }
        }
    }

    fn poll_once(&mut self, snapshot: &Snapshot, counters: &WorkerCounters) -> usize {
        let Self {
            xsk,
            batch,
            sockets,
            state,
            start,
            peers,
            ..
        } = self;
        if state.events.is_none() {
            state.events = counters.events.take_producer(*start);
        }
        let tables = &snapshot.tables;
        let now_ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let mut handled = 0;
        let mut agent_drops = [0u64; 5];
        for s in sockets.iter() {
            let n = match xsk.recv(s.id, batch) {
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!(port = s.port.0, "recv: {e}");
                    continue;
                }
            };
            if n == 0 {
                continue;
            }
            handled += n;
            WorkerCounters::add(&counters.batches, 1);
            for k in 0..n {
                let Some(mut fm) = xsk.frame(batch, k) else {
                    continue;
                };
                let (off, len) = (fm.offset(), fm.len());
                if fm.continuations() > MAX_TAIL {
                    fm.drop_frame();
                    agent_drops[4] += 1;
                    continue;
                }
                let (v, off, len) = {
                    let mut tail: [&[u8]; MAX_TAIL] = [&[]; MAX_TAIL];
                    let (chunk, n) = fm.split_tail(&mut tail);
                    let mut frame = Frame::new(chunk, off, len).with_tail(&tail[..n]);
                    let v = process(tables, state, now_ns, verdict::PortId(s.port.0), &mut frame);
                    (v, frame.offset(), frame.len())
                };
                match v {
                    Verdict::Forward(to) => {
                        let to = PortId(to.0);
                        // The uplink may have one socket per queue: any of ours transmits.
                        match sockets.iter().find(|o| o.port == to) {
                            Some(o) if fm.set_bounds(off, len).is_ok() => fm.forward(o.id),
                            Some(_) => fm.drop_frame(),
                            None => {
                                fm.drop_frame();
                                let other = peers.read().map(|p| p.contains(&to)).unwrap_or(false);
                                if other {
                                    WorkerCounters::add(&counters.handoffs, 1);
                                    agent_drops[0] += 1;
                                } else {
                                    agent_drops[1] += 1;
                                }
                            }
                        }
                    }
                    Verdict::Drop(_) => fm.drop_frame(),
                    Verdict::PassToKernel => {
                        // Back to the kernel through the punt link (see `punt`), addressed to
                        // its kernel side.
                        let punt = snapshot.punt.and_then(|p| {
                            sockets.iter().find(|o| o.port == p.port).map(|o| (o, p))
                        });
                        match punt {
                            Some((o, p)) if fm.set_bounds(off, len).is_ok() && len >= 14 => {
                                if let Some(dst) = fm.data_mut().get_mut(..6) {
                                    dst.copy_from_slice(&p.host_mac.0);
                                }
                                fm.forward(o.id);
                            }
                            _ => {
                                fm.drop_frame();
                                agent_drops[2] += 1;
                            }
                        }
                    }
                }
            }
            if let Err(e) = xsk.complete(batch) {
                tracing::debug!("complete: {e}");
            }
        }
        if let Err(e) = xsk.flush() {
            tracing::debug!("flush: {e}");
        }
        for (i, n) in agent_drops.iter().enumerate() {
            if *n > 0 {
                counters.drop(agent_drop(super::datapath::AGENT_DROPS[i]), *n);
            }
        }
        if handled > 0 {
            let full: u64 = sockets
                .iter()
                .filter_map(|s| xsk.stats(s.id).ok())
                .map(|st| st.tx_queue_full)
                .sum();
            counters.ring_full.store(full, Ordering::Relaxed);
            let ct = state.conntrack.stats();
            counters.ct_entries.store(ct.entries, Ordering::Relaxed);
            counters.ct_evictions.store(ct.evictions, Ordering::Relaxed);
            counters.ct_expired.store(ct.expired, Ordering::Relaxed);
            let c = &state.counters;
            counters.rx.store(c.rx, Ordering::Relaxed);
            counters.tx.store(c.tx, Ordering::Relaxed);
            counters.to_kernel.store(c.passed, Ordering::Relaxed);
            for (i, n) in c.drops.iter().enumerate() {
                if let Some(slot) = counters.drops.get(i) {
                    slot.store(*n, Ordering::Relaxed);
                }
            }
        }
        counters.end_round(state, *start, now_ns, handled, |x| {
            x.read(xsk, sockets.iter().map(|s| (s.port, s.id)))
        });
        handled
    }
}
