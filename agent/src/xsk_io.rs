//! A worker's frame I/O over `sluice-xdp`: one UMEM ([`Xsk`]) shared by the sockets this worker
//! owns, rx batch -> [`sluice_dataplane::pipeline::process`] -> tx batch.
//!
//! Forwarding between two sockets of this worker moves the descriptor (no copy). With several
//! workers ([`super::handoff`] attached), each received frame is first steered
//! ([`sluice_dataplane::steer::owner`]): a frame whose connection another worker owns is copied to it raw,
//! with its ingress port, and dropped here. A verdict naming a port whose socket another worker
//! owns copies the processed frame to that worker ([`super::port_worker`]) for transmission.
//! Frames other workers handed to this one are drained at the start of every round: processed
//! in their handoff buffer, then sent with [`Xsk::send_copy`] (or handed on for transmission).
//! Without handoff rings such frames are dropped and counted as `handoff_unsupported`. With one
//! worker per node (the default for a single-queue uplink) none of this runs. `PassToKernel`
//! after a redirect goes back to the kernel through the punt link (`punt`): counted in
//! `to_kernel`, and as drop `pass_after_redirect` when there is no punt link.
//!
//! Multi-buffer frames: the pipeline reads the continuation chunks in place as the frame's
//! read-only tail ([`sluice_xdp::FrameMut::split_tail`], no copy); headers are always in the first
//! chunk, and the descriptors are forwarded unchanged, chained. A packet of more than
//! [`MAX_TAIL`] continuation chunks (the kernel makes at most 17) is dropped and counted.

use std::os::fd::AsRawFd;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::time::Instant;

use sluice_xdp::{RxBatch, SendError, SocketId, Xsk, XskConfig};

use super::PortSet;
use super::counters::WorkerCounters;
use super::datapath::{SharedLoader, with_loader};
use super::drops::{AgentDrop, AgentDropCounts};
use super::handoff::{Handoff, HandoffError, HandoffKind};
use super::tables::{PortId, Snapshot};
use super::workers::{PortKind, PortSpec, WorkerError, WorkerIo};
use sluice_dataplane::frame::Frame;
use sluice_dataplane::pipeline::{WorkerConfig, WorkerState, process};
use sluice_dataplane::steer::{self, Steer};
use sluice_dataplane::tables::Tables;
use sluice_dataplane::verdict::Verdict;

/// Continuation chunks a packet may have (a 64 KiB packet in 4 KiB chunks needs 16; the kernel's
/// limit is 17 fragments).
pub const MAX_TAIL: usize = 32;

/// UMEM chunks kept in a pod socket's fill ring, at least (two batches of MTU-sized frames or
/// about 8 of 64 KiB).
pub const MIN_POD_FILL: u32 = 128;
/// UMEM chunks kept out of the fill rings, for frames in flight on tx rings and copies.
pub const TX_RESERVE: u32 = 4096;
/// The pod count per worker the UMEM is planned for. A fill ring's chunks cannot be taken back
/// while its pod is idle, so each pod gets a fixed share sized for this many pods (256 chunks of a
/// 16384-chunk UMEM), not a share of what is free when it arrives: pods beyond it get what the
/// reserve leaves and, past about 55 pods per worker, nothing (then the UMEM must grow).
pub const PLANNED_PODS: u32 = 40;

/// The fill target of each pod socket on a UMEM of `frames` chunks whose uplink socket keeps
/// `ring` (the fill ring size) in its fill ring, for `pods` pods.
pub fn pod_fill_share(frames: u32, ring: u32, pods: u32) -> u32 {
    let budget = frames.saturating_sub(ring).saturating_sub(TX_RESERVE);
    (budget / pods.max(1)).clamp(MIN_POD_FILL, ring.max(MIN_POD_FILL))
}

/// Frames drained from each peer's handoff ring per round (the rest wait for the next round).
const DRAIN_BUDGET: usize = 256;

/// What one round counts, flushed into the shared counters at its end (no atomic per frame).
#[derive(Debug, Default)]
struct RoundTally {
    /// The agent's own drops, by [`AgentDrop`].
    drops: AgentDropCounts,
    /// Frames handed to another worker.
    handoffs: u64,
}

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
    /// Ports some other worker owns (for counting `handoff_unsupported` rather than `no_socket`
    /// when there are no handoff rings).
    peers: PortSet,
    /// This worker's ends of the handoff rings (several workers only).
    handoff: Option<Handoff>,
}

impl XskIo {
    /// A worker's UMEM (`cfg`), registering its sockets through `loader`.
    pub fn new(cfg: &XskConfig, loader: SharedLoader, peers: PortSet) -> Result<Self, WorkerError> {
        let xsk = Xsk::new(cfg).map_err(WorkerError::Umem)?;
        let batch = xsk.batch();
        Ok(Self {
            xsk,
            batch,
            sockets: Vec::new(),
            loader,
            state: WorkerState::new(WorkerConfig::default()),
            start: Instant::now(),
            peers,
            handoff: None,
        })
    }
}

fn open_err(spec: &PortSpec, source: sluice_xdp::XskError) -> WorkerError {
    WorkerError::Open {
        ifname: spec.ifname.clone(),
        queue: spec.queue,
        source,
    }
}

impl WorkerIo for XskIo {
    fn open_port(&mut self, spec: &PortSpec) -> Result<RawFd, WorkerError> {
        let fill = match spec.kind {
            PortKind::Uplink => self.xsk.config().fill_size,
            PortKind::Pod => {
                let cfg = self.xsk.config();
                pod_fill_share(cfg.frame_count, cfg.fill_size, PLANNED_PODS)
            }
            PortKind::Punt => 0,
        };
        let id = self
            .xsk
            .open_socket_with(&spec.ifname, spec.queue, fill)
            .map_err(|e| open_err(spec, e))?;
        let fd = self.xsk.fd(id).map_err(|e| open_err(spec, e))?;
        let raw = fd.as_raw_fd();
        let registered = with_loader(
            &self.loader,
            "register an AF_XDP socket",
            &spec.ifname,
            |l| l.register_socket(spec.port.0, spec.queue, fd),
        );
        if let Err(source) = registered {
            let _ = self.xsk.close_socket(id);
            return Err(WorkerError::Register {
                ifname: spec.ifname.clone(),
                queue: spec.queue,
                source,
            });
        }
        self.sockets.push(OwnedSocket {
            port: spec.port,
            queue: spec.queue,
            id,
        });
        Ok(raw)
    }

    fn attach_handoff(&mut self, handoff: Handoff) {
        self.state.steer = Steer {
            worker: u16::try_from(handoff.worker).unwrap_or(0),
            workers: u16::try_from(handoff.workers).unwrap_or(1),
        };
        self.handoff = Some(handoff);
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
            handoff,
            ..
        } = self;
        if state.events.is_none() {
            state.events = counters.events.take_sink(*start);
        }
        let tables = &snapshot.tables;
        let now_ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let mut handled = 0;
        let mut tally = RoundTally::default();
        if let Some(h) = handoff.as_mut() {
            handled += drain_handoffs(h, xsk, sockets, state, snapshot, now_ns, &mut tally);
        }
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
                    tally.drops.add(AgentDrop::TooManyFragments);
                    continue;
                }
                // Steering: a connection another worker owns goes there raw, with its ingress.
                if let Some(h) = handoff.as_mut()
                    && let Some(owner) = steer::owner(tables, fm.data(), s.port, h.workers)
                    && owner != h.worker
                {
                    let mut parts: [&[u8]; MAX_TAIL + 1] = [&[]; MAX_TAIL + 1];
                    let (chunk, n) = fm.split_tail(&mut parts[1..]);
                    parts[0] = chunk.get(off..off + len).unwrap_or(&[]);
                    hand_off(
                        h,
                        owner,
                        HandoffKind::Process,
                        s.port,
                        &parts[..=n],
                        &mut tally,
                    );
                    fm.drop_frame();
                    continue;
                }
                let (v, off, len) = {
                    let mut tail: [&[u8]; MAX_TAIL] = [&[]; MAX_TAIL];
                    let (chunk, n) = fm.split_tail(&mut tail);
                    let mut frame = Frame::new(chunk, off, len).with_tail(&tail[..n]);
                    let v = process(tables, state, now_ns, s.port, &mut frame);
                    (v, frame.offset(), frame.len())
                };
                match v {
                    Verdict::Forward(to) => {
                        // The uplink may have one socket per queue: any of ours transmits.
                        match sockets.iter().find(|o| o.port == to) {
                            Some(o) if fm.set_bounds(off, len).is_ok() => fm.forward(o.id),
                            Some(_) => fm.drop_frame(),
                            None => {
                                if let Some(h) = handoff.as_mut() {
                                    let mut parts: [&[u8]; MAX_TAIL + 1] = [&[]; MAX_TAIL + 1];
                                    let (chunk, n) = fm.split_tail(&mut parts[1..]);
                                    parts[0] = chunk.get(off..off + len).unwrap_or(&[]);
                                    let w = super::port_worker(to, h.workers);
                                    let parts = &parts[..=n];
                                    hand_off(h, w, HandoffKind::Transmit, to, parts, &mut tally);
                                } else if peers.read().map(|p| p.contains(&to)).unwrap_or(false) {
                                    tally.drops.add(AgentDrop::HandoffUnsupported);
                                } else {
                                    tally.drops.add(AgentDrop::NoSocket);
                                }
                                fm.drop_frame();
                            }
                        }
                    }
                    // `process` never steers (steering happened above).
                    Verdict::Drop(_) | Verdict::Steer(_) => fm.drop_frame(),
                    // Not sent yet by this worker (pods' routes to other nodes carry the
                    // underlay MTU until it segments).
                    Verdict::Segment(_) | Verdict::FragNeeded(_) => {
                        fm.drop_frame();
                        tally.drops.add(AgentDrop::TooLarge);
                    }
                    Verdict::PassToKernel => {
                        // Back to the kernel through the punt link (see `punt`), addressed to
                        // its kernel side.
                        let punt = snapshot.punt.and_then(|p| {
                            sockets.iter().find(|o| o.port == p.port).map(|o| (o, p))
                        });
                        match punt {
                            Some((o, p))
                                if fm.set_bounds(off, len).is_ok()
                                    && p.readdress(fm.data_mut()) =>
                            {
                                fm.forward(o.id);
                            }
                            _ => {
                                fm.drop_frame();
                                tally.drops.add(AgentDrop::PassAfterRedirect);
                            }
                        }
                    }
                }
            }
            if let Err(e) = xsk.complete(batch) {
                tracing::debug!("complete: {e}");
            }
        }
        if let Some(h) = handoff.as_mut() {
            h.wake_peers();
        }
        if let Err(e) = xsk.flush() {
            tracing::debug!("flush: {e}");
        }
        if tally.handoffs > 0 {
            WorkerCounters::add(&counters.handoffs, tally.handoffs);
        }
        for (reason, n) in tally.drops.nonzero() {
            counters.drop(reason.index(), n);
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

/// Copy a frame to worker `to` (counted in `handoffs`, or dropped with its reason).
fn hand_off(
    h: &mut Handoff,
    to: usize,
    kind: HandoffKind,
    port: PortId,
    parts: &[&[u8]],
    tally: &mut RoundTally,
) {
    match h.send(to, kind, port, parts) {
        Ok(()) => tally.handoffs += 1,
        Err(HandoffError::Full) => tally.drops.add(AgentDrop::HandoffFull),
        Err(HandoffError::TooLarge) => tally.drops.add(AgentDrop::TooLarge),
        Err(HandoffError::NoPeer) => tally.drops.add(AgentDrop::NoSocket),
    }
}

/// Send `data` on our socket for `to`, copied into this UMEM.
fn transmit_copy(
    xsk: &mut Xsk,
    sockets: &[OwnedSocket],
    to: PortId,
    data: &[u8],
    drops: &mut AgentDropCounts,
) -> bool {
    let Some(o) = sockets.iter().find(|o| o.port == to) else {
        return false;
    };
    match xsk.send_copy(o.id, &[data]) {
        Ok(()) => {}
        Err(SendError::QueueFull | SendError::NoFreeChunks) => drops.add(AgentDrop::TxFull),
        Err(SendError::TooLarge) => drops.add(AgentDrop::TooLarge),
        Err(SendError::Empty | SendError::NoSuchSocket) => drops.add(AgentDrop::NoSocket),
    }
    true
}

/// Handle what other workers handed to this one: run the pipeline on raw frames, transmit
/// processed ones. Returns the number of frames taken from the rings.
fn drain_handoffs(
    h: &mut Handoff,
    xsk: &mut Xsk,
    sockets: &[OwnedSocket],
    state: &mut WorkerState,
    snapshot: &Snapshot,
    now_ns: u64,
    tally: &mut RoundTally,
) -> usize {
    let tables: &Tables = &snapshot.tables;
    let mut n = 0;
    for from in 0..h.workers {
        for _ in 0..DRAIN_BUDGET {
            let Some(mut f) = h.recv(from) else {
                break;
            };
            n += 1;
            let to = match f.kind {
                HandoffKind::Transmit => Some(f.port),
                HandoffKind::Process => {
                    let ingress = f.port;
                    let (buf, off, len) = f.window_mut();
                    let mut frame = Frame::new(buf, off, len);
                    let v = process(tables, state, now_ns, ingress, &mut frame);
                    let (off, len) = (frame.offset(), frame.len());
                    f.set_window(off, len);
                    match v {
                        Verdict::Forward(to) => Some(to),
                        // `process` never steers: handed-off frames stay here.
                        Verdict::Drop(_) | Verdict::Steer(_) => None,
                        Verdict::Segment(_) | Verdict::FragNeeded(_) => {
                            tally.drops.add(AgentDrop::TooLarge);
                            None
                        }
                        // Back to the kernel through the punt link, addressed to its kernel side.
                        Verdict::PassToKernel => match snapshot.punt {
                            Some(p) if p.readdress(f.data_mut()) => Some(p.port),
                            _ => {
                                tally.drops.add(AgentDrop::PassAfterRedirect);
                                None
                            }
                        },
                    }
                }
            };
            if let Some(to) = to
                && !transmit_copy(xsk, sockets, to, f.data(), &mut tally.drops)
            {
                // Not ours to transmit: on to the port's worker, once (never back and forth).
                let w = super::port_worker(to, h.workers);
                if f.kind == HandoffKind::Process && w != h.worker {
                    hand_off(h, w, HandoffKind::Transmit, to, &[f.data()], tally);
                } else {
                    tally.drops.add(AgentDrop::NoSocket);
                }
            }
            h.release(from, f);
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_share_what_the_uplink_and_tx_leave() {
        // 16384 chunks, rings of 2048: 10240 for the pods.
        assert_eq!(pod_fill_share(16384, 2048, 1), 2048, "one pod: a full ring");
        assert_eq!(pod_fill_share(16384, 2048, 5), 2048);
        assert_eq!(pod_fill_share(16384, 2048, 10), 1024);
        assert_eq!(pod_fill_share(16384, 2048, 80), 128);
        assert_eq!(pod_fill_share(16384, 2048, 500), MIN_POD_FILL, "the floor");
        assert_eq!(pod_fill_share(1024, 2048, 0), MIN_POD_FILL, "a tiny UMEM");
        assert_eq!(pod_fill_share(16384, 2048, PLANNED_PODS), 256);
        for pods in 1..=80 {
            let share = pod_fill_share(16384, 2048, pods);
            assert!(
                2048 + TX_RESERVE + share * pods <= 16384,
                "{pods} pods overcommit"
            );
        }
    }
}
