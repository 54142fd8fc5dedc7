//! A worker's frame I/O over `sluice-xdp`: one UMEM ([`Xsk`]) shared by the sockets this worker
//! owns. A round: frames other workers handed over, then one receive batch per socket, each run
//! through [`sluice_dataplane::pipeline::process_batch`] whole, then every verdict acted on, then
//! transmit, then the counters.
//!
//! Receive ([`XskIo::receive`]): [`Xsk::frames`] lends every packet of the batch at once; their
//! first chunks (writable) and continuation chunks (read-only tail) become the pipeline's frames
//! without a copy; each packet's verdict and new window are kept as an [`Outcome`].
//!
//! Act ([`XskIo::act`]): forwarding to a socket of this worker moves the descriptors (no copy;
//! the socket is found through a dense index by port). A verdict naming a port whose socket
//! another worker owns copies the processed frame to that worker ([`super::port_worker`]) for
//! transmission; [`Verdict::Steer`] (several workers: the pipeline found another worker owns the
//! connection) copies the frame as it arrived, with its ingress port, to that worker. Both copies
//! go straight into chunks the receiving worker lent ([`super::handoff`]); frames handed to this
//! worker are adopted into the batch at the start of every round, processed in place (never
//! steered again) and sent by moving their descriptors (or handed on once for transmission).
//! Without handoff rings such frames are dropped and counted as `handoff_unsupported`.
//! `PassToKernel` after a redirect goes back to the kernel through the punt link (`punt`):
//! counted in `to_kernel`, and as drop `pass_after_redirect` when there is no punt link.
//! [`Verdict::Segment`] (a pod's large frame towards another node) is cut by `segment` straight
//! into fresh chunks ([`Xsk::emit_from`]), each piece VXLAN-encapsulated with the flow's tunnel
//! and queued on the uplink; [`Verdict::FragNeeded`] is answered with the ICMP error, sent back
//! on the ingress socket. On the uplink, TCP segments of one flow to a local pod are coalesced
//! (GRO) after the pipeline and leave as one packet.
//!
//! Multi-buffer frames: headers are always in the first chunk; the descriptors are forwarded
//! unchanged, chained.

use std::os::fd::AsRawFd;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::time::Instant;

use arrayvec::ArrayVec;
use sluice_xdp::xsk::MAX_SEGMENTS;
use sluice_xdp::{
    Emitted, LentRefusal, RxBatch, SendError, SocketId, Verdict as XskVerdict, Xsk, XskConfig,
};

use super::PortSet;
use super::counters::WorkerCounters;
use super::datapath::{SharedLoader, with_loader};
use super::drops::{AgentDrop, AgentDropCounts};
use super::handoff::{Handoff, HandoffError, HandoffKind};
use super::tables::{PortId, Snapshot};
use super::workers::{PortKind, PortSpec, Round, WorkerError, WorkerIo};
use sluice_dataplane::coalesce::{self, ChecksumTrust, Merged};
use sluice_dataplane::frame::{Frame, TxChecksum};
use sluice_dataplane::pipeline::{BATCH, WorkerConfig, WorkerState, process, process_batch};
use sluice_dataplane::route;
use sluice_dataplane::segment::{self, FlowTunnel, Oversize};
use sluice_dataplane::steer::Steer;
use sluice_dataplane::tables::Tables;
use sluice_dataplane::verdict::{DropReason, Verdict};
use sluice_dataplane::vxlan;

/// UMEM chunks a pod socket always keeps in its fill ring, however idle (a batch of MTU-sized
/// frames, or four of 64 KiB); a busy pod deepens its ring from [`UmemPlan::fill_boost`].
pub const POD_FILL: u32 = 64;
/// The fill ring size: what the uplink socket keeps, and what a busy pod's ring grows to at most.
pub const FILL_RING: u32 = 2048;
/// UMEM chunks kept out of the fill rings, for frames in flight on tx rings and copies.
pub const TX_RESERVE: u32 = 4096;
/// UMEM chunk size (the agent registers its UMEMs with it, and [`UmemPlan::bytes`] counts in it).
pub const CHUNK: u32 = 4096;

/// How a worker's UMEM is sized for the node's pods. Every worker opens a socket on every pod
/// (one queue each), so each UMEM must hold a fill share for all of them: [`POD_FILL`] per pod,
/// the uplink's full ring, a pool of two full rings shared by busy pods (the `fill_boost` of
/// `sluice_xdp::fill`), [`TX_RESERVE`], and a quarter more for the chunks lent to the other
/// workers (`handoff::LEND_SHARE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UmemPlan {
    /// Chunks of each worker's UMEM.
    pub frames: u32,
    /// Chunks the busy sockets may keep beyond their base shares, together.
    pub fill_boost: u32,
}

impl UmemPlan {
    /// The plan for a node of at most `max_pods` pods.
    pub fn for_pods(max_pods: u32) -> Self {
        let fill_boost = 2 * FILL_RING;
        let kept = FILL_RING + max_pods * POD_FILL + fill_boost + TX_RESERVE;
        let share = crate::handoff::LEND_SHARE as u32;
        let frames = (kept * share).div_ceil(share - 1).next_multiple_of(1024);
        Self { frames, fill_boost }
    }

    /// Bytes of memory each worker's UMEM pins.
    pub fn bytes(&self) -> u64 {
        u64::from(self.frames) * u64::from(CHUNK)
    }
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
    /// Frames forwarded on this worker's sockets to a pod (not the uplink).
    to_pods: usize,
}

/// One socket of this worker.
#[derive(Debug, Clone, Copy)]
struct OwnedSocket {
    port: PortId,
    queue: u32,
    id: SocketId,
}

/// Which of this worker's sockets transmits on a port: a dense table indexed by the port id (the
/// interface's ifindex), so a verdict finds its socket with one load, not a scan of the sockets
/// (a worker holds one per pod). Grows to the highest ifindex opened (8 bytes each).
#[derive(Debug, Default)]
struct SocketIndex(Vec<Option<SocketId>>);

impl SocketIndex {
    #[inline]
    fn get(&self, port: PortId) -> Option<SocketId> {
        self.0.get(port.0 as usize).copied().flatten()
    }

    /// Make `id` the socket of `port` unless it has one (the uplink may have one per queue: any
    /// of them transmits).
    fn insert(&mut self, port: PortId, id: SocketId) {
        let i = port.0 as usize;
        if self.0.len() <= i {
            self.0.resize(i + 1, None);
        }
        self.0[i].get_or_insert(id);
    }

    /// Point `port` at one of `sockets` that still serves it, or at none.
    fn rebuild(&mut self, port: PortId, sockets: &[OwnedSocket]) {
        if let Some(slot) = self.0.get_mut(port.0 as usize) {
            *slot = sockets.iter().find(|s| s.port == port).map(|s| s.id);
        }
    }
}

/// What the pipeline decided for one packet of a receive batch, kept once its frame is gone: the
/// verdict and the packet's new window in its first chunk.
#[derive(Debug, Clone, Copy)]
struct Outcome {
    verdict: Verdict,
    off: usize,
    len: usize,
    /// The checksum the transmitter completes (see `Frame::tx_checksum`).
    csum: Option<TxChecksum>,
    /// Its payload travels behind another packet of the batch (GRO): nothing to do on its own.
    absorbed: bool,
}

/// One GRO piece to chain: bytes `off..off + len` of buffer `buf` of packet `follower` (after its
/// window moved to `window`) go behind packet `leader` (`RxBatch::append_piece`).
#[derive(Debug, Clone, Copy)]
struct Chain {
    leader: usize,
    follower: usize,
    window: (usize, usize),
    buf: usize,
    off: usize,
    len: usize,
}

/// Bytes of the scratch buffer where an ICMP answer is built before it is copied into the UMEM
/// (at most 576 bytes of IP, as RFC 1812 has it, in an Ethernet frame).
const SCRATCH: usize = 1024;

/// AF_XDP frame I/O of one worker.
#[derive(Debug)]
pub struct XskIo {
    xsk: Xsk,
    batch: RxBatch,
    sockets: Vec<OwnedSocket>,
    index: SocketIndex,
    /// One per packet of the current batch (capacity: the batch size; never reallocates).
    outcomes: Vec<Outcome>,
    /// GRO pieces of the current batch (capacity: every packet but one a piece; never
    /// reallocates).
    chains: Vec<Chain>,
    /// Where ICMP answers are built (see [`SCRATCH`]); allocated once.
    scratch: Box<[u8]>,
    /// What each packet adopted from a peer into the batch is (capacity: the batch size).
    handed: Vec<(HandoffKind, PortId, Option<TxChecksum>)>,
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
        let mut state = WorkerState::new(WorkerConfig::default());
        state.tx_checksum_offload = xsk.tx_checksum_offload();
        tracing::debug!(offload = state.tx_checksum_offload, "tx checksum offload");
        Ok(Self {
            xsk,
            batch,
            sockets: Vec::new(),
            index: SocketIndex::default(),
            outcomes: Vec::with_capacity(cfg.batch_size),
            chains: Vec::with_capacity(cfg.batch_size * coalesce::MAX_PIECES),
            scratch: vec![0u8; SCRATCH].into_boxed_slice(),
            handed: Vec::with_capacity(cfg.batch_size),
            loader,
            state,
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
            PortKind::Pod => POD_FILL,
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
        self.index.insert(spec.port, id);
        Ok(raw)
    }

    fn attach_handoff(&mut self, handoff: Handoff) {
        self.state.steer = Steer {
            worker: u16::try_from(handoff.worker).unwrap_or(0),
            workers: u16::try_from(handoff.workers).unwrap_or(1),
        };
        self.handoff = Some(handoff);
    }

    fn trace(
        &mut self,
        worker: usize,
        tables: &Snapshot,
        job: &crate::trace::TraceJob,
    ) -> crate::trace::TraceRun {
        let now_ns = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        crate::trace::run(worker, tables, &self.state, now_ns, job)
    }

    fn close_port(&mut self, port: PortId) {
        let (gone, keep): (Vec<_>, Vec<_>) = self.sockets.iter().partition(|s| s.port == port);
        self.sockets = keep;
        self.index.rebuild(port, &self.sockets);
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

    fn poll_once(&mut self, snapshot: &Snapshot, counters: &WorkerCounters) -> Round {
        if self.state.events.is_none() {
            self.state.events = counters.events.take_sink(self.start);
        }
        let now_ns = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let mut tally = RoundTally::default();
        let mut handled = self.drain_handoffs(snapshot, now_ns, &mut tally);
        for k in 0..self.sockets.len() {
            let n = self.receive(k, snapshot, now_ns, &mut tally);
            if n > 0 {
                WorkerCounters::add(&counters.batches, 1);
                handled += n;
            }
        }
        if let Some(h) = self.handoff.as_mut() {
            h.wake_peers();
        }
        if let Err(e) = self.xsk.flush() {
            tracing::debug!("flush: {e}");
        }
        self.publish(counters, &tally, now_ns, handled);
        Round {
            handled,
            to_pods: tally.to_pods,
        }
    }
}

/// Run the pipeline over the whole batch just received on `ingress`: every packet lent at once
/// ([`Xsk::frames`]), as frames over their own chunks, through `process_batch` in groups of
/// [`BATCH`]; one [`Outcome`] per packet, in batch order, into `outcomes`.
///
/// With `gro` (for what arrives on the uplink), the TCP segments of a group that go to a pod
/// through one of this worker's sockets (`local`) are then coalesced (`coalesce`: in-order
/// segments of one flow become one packet for the pod, its first segment's headers rewritten),
/// and the pieces to chain behind each merged packet's first segment go into `chains`.
#[expect(
    clippy::too_many_arguments,
    reason = "the worker's disjoint fields, borrowed at once"
)]
fn run_pipeline(
    xsk: &Xsk,
    batch: &mut RxBatch,
    tables: &Tables,
    state: &mut WorkerState,
    now_ns: u64,
    ingress: PortId,
    gro: Option<&dyn Fn(PortId) -> bool>,
    outcomes: &mut Vec<Outcome>,
    chains: &mut Vec<Chain>,
) {
    outcomes.clear();
    chains.clear();
    let mut lent = xsk.frames(batch);
    loop {
        // The continuation chunks of a group's packets, all of them, then the frames over them.
        let mut heads: ArrayVec<(&mut [u8], usize, usize, usize, usize), BATCH> = ArrayVec::new();
        let mut tails: ArrayVec<&[u8], { BATCH * MAX_SEGMENTS }> = ArrayVec::new();
        for fm in lent.by_ref().take(BATCH) {
            let (chunk, off, len, conts) = fm.into_parts();
            let first = tails.len();
            // At most MAX_SEGMENTS - 1 continuations per packet (`recv` refuses longer chains).
            for c in conts {
                if tails.try_push(c).is_err() {
                    break;
                }
            }
            heads.push((chunk, off, len, first, tails.len()));
        }
        if heads.is_empty() {
            break;
        }
        let mut frames: ArrayVec<Frame<'_>, BATCH> = heads
            .into_iter()
            .map(|(chunk, off, len, a, b)| Frame::new(chunk, off, len).with_tail(&tails[a..b]))
            .collect();
        let mut verdicts = [Verdict::PassToKernel; BATCH];
        let n = frames.len();
        process_batch(
            tables,
            state,
            now_ns,
            ingress,
            &mut frames,
            &mut verdicts[..n],
        );
        let base = outcomes.len();
        outcomes.extend(frames.iter().zip(&verdicts).map(|(f, v)| Outcome {
            verdict: *v,
            off: f.offset(),
            len: f.len(),
            csum: f.tx_checksum(),
            absorbed: false,
        }));
        if let Some(local) = gro {
            coalesce_group(frames, &verdicts[..n], local, base, outcomes, chains);
        }
    }
}

/// GRO over one group of processed frames (batch indexes from `base`): the frames forwarded to
/// a local pod socket are coalesced; every merge's pieces go into `chains` and its segments but
/// the first are marked absorbed. Only frames with the same verdict can be in one merge: a merge
/// is one flow, and frames of one flow forwarded to a pod all go to that pod.
fn coalesce_group(
    frames: ArrayVec<Frame<'_>, BATCH>,
    verdicts: &[Verdict],
    local: &dyn Fn(PortId) -> bool,
    base: usize,
    outcomes: &mut [Outcome],
    chains: &mut Vec<Chain>,
) {
    let mut eligible: ArrayVec<Frame<'_>, BATCH> = ArrayVec::new();
    let mut index: ArrayVec<usize, BATCH> = ArrayVec::new();
    for (k, f) in frames.into_iter().enumerate() {
        if matches!(verdicts[k], Verdict::Forward(p) if local(p)) {
            eligible.push(f);
            index.push(base + k);
        }
    }
    if eligible.len() < 2 {
        return;
    }
    let mut plan = [Merged::default(); BATCH];
    let n = coalesce::coalesce(&mut eligible, ChecksumTrust::Derive, &mut plan);
    for m in plan[..n].iter().filter(|m| m.is_merge()) {
        let leader = index[m.first()];
        // The leader's header now says the merged length; its window is unchanged.
        outcomes[leader].len = eligible[m.first()].len();
        for p in m.pieces() {
            let follower = index[usize::from(p.frame)];
            let o = &mut outcomes[follower];
            o.absorbed = true;
            chains.push(Chain {
                leader,
                follower,
                window: (o.off, o.len),
                buf: usize::from(p.buf),
                off: p.off as usize,
                len: p.len as usize,
            });
        }
    }
}

impl XskIo {
    /// Receive one batch on socket `k`, run the pipeline over all of it, act on every verdict and
    /// complete the batch. Returns the packets received.
    fn receive(
        &mut self,
        k: usize,
        snapshot: &Snapshot,
        now_ns: u64,
        tally: &mut RoundTally,
    ) -> usize {
        let s = self.sockets[k];
        let n = match self.xsk.recv(s.id, &mut self.batch) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(port = s.port.0, "recv: {e}");
                return 0;
            }
        };
        if n == 0 {
            return 0;
        }
        let index = &self.index;
        let uplink = snapshot.tables.node.uplink;
        let local = |p: PortId| p != uplink && index.get(p).is_some();
        run_pipeline(
            &self.xsk,
            &mut self.batch,
            &snapshot.tables,
            &mut self.state,
            now_ns,
            s.port,
            (s.port == uplink).then_some(&local as &dyn Fn(PortId) -> bool),
            &mut self.outcomes,
            &mut self.chains,
        );
        self.chain_pieces(tally);
        for i in 0..self.outcomes.len() {
            let o = self.outcomes[i];
            if !o.absorbed {
                self.act(i, s.port, o, true, snapshot, tally);
            }
        }
        if let Err(e) = self.xsk.complete(&mut self.batch) {
            tracing::debug!("complete: {e}");
        }
        n
    }

    /// Chain the GRO pieces behind their merged packets. A merge that cannot be chained whole is
    /// dropped (its first segment's header already says the merged length); the kernel's TCP
    /// retransmits it.
    fn chain_pieces(&mut self, tally: &mut RoundTally) {
        for c in &self.chains {
            let chained = self
                .batch
                .set_bounds(c.follower, c.window.0, c.window.1)
                .is_ok()
                && self
                    .batch
                    .append_piece(c.leader, c.follower, c.buf, c.off, c.len)
                    .is_ok();
            if !chained {
                let leader = &mut self.outcomes[c.leader];
                if !matches!(leader.verdict, Verdict::Drop(_)) {
                    leader.verdict = Verdict::Drop(DropReason::FrameTooBig);
                    tally.drops.add(AgentDrop::TooLarge);
                }
            }
        }
    }

    /// Carry out the verdict of packet `i` of the batch, which arrived on `ingress` (received, or
    /// handed over by another worker: then `hand_on` is false for a frame that came to be
    /// transmitted, so nothing travels back and forth). A packet left without a transmit verdict
    /// goes back to the free list when the batch completes.
    fn act(
        &mut self,
        i: usize,
        ingress: PortId,
        o: Outcome,
        hand_on: bool,
        snapshot: &Snapshot,
        tally: &mut RoundTally,
    ) {
        match o.verdict {
            Verdict::Forward(to) => match self.index.get(to) {
                Some(id) => {
                    if to != snapshot.tables.node.uplink {
                        tally.to_pods += 1;
                    }
                    self.forward(i, o, id, tally);
                }
                // Another worker has the socket: the processed frame goes there to be sent.
                None if hand_on => {
                    let w = self
                        .handoff
                        .as_ref()
                        .map(|h| super::port_worker(to, h.workers))
                        .filter(|w| self.handoff.as_ref().is_some_and(|h| *w != h.worker));
                    self.hand_off_packet(i, Some(o), w, HandoffKind::Transmit, to, tally);
                }
                None => tally.drops.add(AgentDrop::NoSocket),
            },
            Verdict::Drop(_) => {}
            Verdict::PassToKernel => self.punt(i, o, snapshot, tally),
            // Another worker owns the connection: the frame as it arrived, with its ingress port.
            Verdict::Steer(w) => {
                self.hand_off_packet(
                    i,
                    None,
                    Some(usize::from(w)),
                    HandoffKind::Process,
                    ingress,
                    tally,
                );
            }
            Verdict::Segment(to) => self.segment(i, o, to, &snapshot.tables, tally),
            Verdict::FragNeeded(mtu) => match self.index.get(ingress) {
                Some(back) => self.answer_frag_needed(i, back, mtu, &snapshot.tables, tally),
                None => tally.drops.add(AgentDrop::NoSocket),
            },
        }
    }

    /// Forward packet `i` on our socket `id` with its new window (and its checksum request).
    fn forward(&mut self, i: usize, o: Outcome, id: SocketId, tally: &mut RoundTally) {
        if self.batch.set_bounds(i, o.off, o.len).is_err() {
            // No room left in front for the tx metadata: cannot be described to the kernel.
            tally.drops.add(AgentDrop::TooLarge);
            return;
        }
        if let Some(c) = o.csum
            && self.batch.set_tx_checksum(i, c.start, c.offset).is_err()
        {
            // The pipeline asks only when this worker offloads, for a field in the headers.
            tally.drops.add(AgentDrop::TooLarge);
            return;
        }
        self.batch.set_verdict(i, XskVerdict::Forward(id));
    }

    /// Back to the kernel through the punt link (see `punt`), addressed to its kernel side.
    fn punt(&mut self, i: usize, o: Outcome, snapshot: &Snapshot, tally: &mut RoundTally) {
        let Some((id, p)) = snapshot
            .punt
            .and_then(|p| self.index.get(p.port).map(|id| (id, p)))
        else {
            tally.drops.add(AgentDrop::PassAfterRedirect);
            return;
        };
        let readdressed = self.batch.set_bounds(i, o.off, o.len).is_ok()
            && self
                .xsk
                .frame(&mut self.batch, i)
                .is_some_and(|mut f| p.readdress(f.data_mut()));
        if readdressed {
            self.batch.set_verdict(i, XskVerdict::Forward(id));
        } else {
            tally.drops.add(AgentDrop::PassAfterRedirect);
        }
    }

    /// Copy packet `i` to worker `to` (`None`: no handoff rings): `Transmit` with its processed
    /// window `o` and its egress `port`, or `Process` as it arrived (`o` is `None`) with its
    /// ingress `port`.
    fn hand_off_packet(
        &mut self,
        i: usize,
        o: Option<Outcome>,
        to: Option<usize>,
        kind: HandoffKind,
        port: PortId,
        tally: &mut RoundTally,
    ) {
        let (Some(h), Some(to)) = (self.handoff.as_mut(), to) else {
            if self
                .peers
                .read()
                .map(|p| p.contains(&port))
                .unwrap_or(false)
            {
                tally.drops.add(AgentDrop::HandoffUnsupported);
            } else {
                tally.drops.add(AgentDrop::NoSocket);
            }
            return;
        };
        let Some(fm) = self.xsk.frame(&mut self.batch, i) else {
            return;
        };
        let (chunk, off, len, conts) = fm.into_parts();
        let (off, len) = o.map_or((off, len), |o| (o.off, o.len));
        let mut parts: ArrayVec<&[u8], MAX_SEGMENTS> = ArrayVec::new();
        parts.push(chunk.get(off..off + len).unwrap_or(&[]));
        parts.extend(conts.take(MAX_SEGMENTS - 1));
        hand_off(h, to, kind, port, o.and_then(|o| o.csum), &parts, tally);
    }

    /// Cut packet `i` (a pod's frame towards another node, rewritten for its route, larger than
    /// VXLAN carries) into pieces written straight into fresh chunks of our UMEM
    /// ([`Xsk::emit_from`]), each VXLAN-encapsulated with the flow's tunnel and queued on our
    /// socket for `to` (the uplink). One copy of the payload, summed on the way.
    fn segment(
        &mut self,
        i: usize,
        o: Outcome,
        to: PortId,
        tables: &Tables,
        tally: &mut RoundTally,
    ) {
        let Some(id) = self.index.get(to) else {
            tally.drops.add(AgentDrop::NoSocket);
            return;
        };
        let Ok((src, mut out)) = self.xsk.emit_from(&mut self.batch, i, id) else {
            tally.drops.add(AgentDrop::NoSocket);
            return;
        };
        let (chunk, _, _, conts) = src.into_parts();
        let tail: ArrayVec<&[u8], MAX_SEGMENTS> = conts.collect();
        let frame = Frame::new(chunk, o.off, o.len).with_tail(&tail);
        let Ok(Oversize::Split(mut seg)) = segment::plan(&frame, usize::from(tables.vxlan_mtu))
        else {
            tally.drops.add(AgentDrop::TooLarge);
            return;
        };
        let Some(tunnel) = route::tunnel_to(tables, seg.flow_key().dst) else {
            tally.drops.add(AgentDrop::NoSocket);
            return;
        };
        let tunnel = FlowTunnel::new(tunnel, seg.flow_key());
        while let Some(len) = seg.next_len() {
            let need = out.tail_chunks_for(len, vxlan::OVERHEAD);
            let mut b = match out.buffers(need) {
                Ok(b) => b,
                Err(e) => {
                    // Out of chunks or tx queue room: the rest of the frame is lost (TCP resends).
                    count_send_error(e, &mut tally.drops);
                    return;
                }
            };
            let start = b.data_start() + vxlan::OVERHEAD;
            let emitted = {
                let (head, tails) = b.parts();
                let Ok(w) = seg.write_next(head, start, tails) else {
                    tally.drops.add(AgentDrop::TooLarge);
                    return;
                };
                // The piece with its tail buffers: encapsulation takes the outer lengths from
                // the whole inner frame.
                let tail: ArrayVec<&[u8], MAX_SEGMENTS> = tails
                    .iter()
                    .take(w.tail_bufs)
                    .enumerate()
                    .map(|(k, t)| {
                        if k + 1 == w.tail_bufs {
                            t.get(..w.last_tail_len).unwrap_or(t)
                        } else {
                            &t[..]
                        }
                    })
                    .collect();
                let mut piece = Frame::new(head, start, w.head_len).with_tail(&tail);
                if tunnel.encap(&mut piece, self.state.next_ip_id()).is_err() {
                    tally.drops.add(AgentDrop::TooLarge);
                    return;
                }
                Emitted {
                    offset: piece.offset(),
                    head_len: piece.len(),
                    tail_bufs: w.tail_bufs,
                    last_tail_len: w.last_tail_len,
                }
            };
            let queued = b.queue(emitted);
            if queued.is_err() {
                tally.drops.add(AgentDrop::TooLarge);
                return;
            }
        }
    }

    /// Answer packet `i` (DF set, too large for its route) with ICMP "fragmentation needed" for
    /// `mtu`, sent back on the socket it came from.
    fn answer_frag_needed(
        &mut self,
        i: usize,
        back: SocketId,
        mtu: u16,
        tables: &Tables,
        tally: &mut RoundTally,
    ) {
        let n = {
            let Some(fm) = self.xsk.frame(&mut self.batch, i) else {
                return;
            };
            let (chunk, off, len, conts) = fm.into_parts();
            let tail: ArrayVec<&[u8], MAX_SEGMENTS> = conts.collect();
            let frame = Frame::new(chunk, off, len).with_tail(&tail);
            frag_answer(&frame, mtu, tables, &mut self.state, &mut self.scratch)
        };
        if let Some(n) = n {
            send_pieces(
                &mut self.xsk,
                back,
                &self.scratch,
                &[(0, n)],
                &mut tally.drops,
            );
        }
    }

    /// Store what the metrics read: the round's agent drops and handoffs, and after a round that
    /// handled frames the pipeline's counters, conntrack's and the tx ring's; then the end of
    /// the round (conntrack expiry, busy time, the AF_XDP view).
    fn publish(
        &mut self,
        counters: &WorkerCounters,
        tally: &RoundTally,
        now_ns: u64,
        handled: usize,
    ) {
        if tally.handoffs > 0 {
            WorkerCounters::add(&counters.handoffs, tally.handoffs);
        }
        for (reason, n) in tally.drops.nonzero() {
            counters.drop(reason.index(), n);
        }
        let Self {
            xsk,
            sockets,
            state,
            start,
            ..
        } = self;
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
    }

    /// Handle what other workers handed to this one: frames in chunks this worker lent, adopted
    /// into the (empty, at the start of a round) batch; raw ones run through the pipeline (never
    /// steered again), processed ones go to their port; then act and complete as for a received
    /// batch. Also tops up the chunks lent to each peer. Returns the frames taken from the rings.
    fn drain_handoffs(
        &mut self,
        snapshot: &Snapshot,
        now_ns: u64,
        tally: &mut RoundTally,
    ) -> usize {
        let Some(h) = self.handoff.as_mut() else {
            return 0;
        };
        h.lend(&mut self.xsk);
        let mut n = 0;
        for from in 0..h.workers {
            for _ in 0..DRAIN_BUDGET {
                let Some(h) = self.handoff.as_mut() else {
                    return n;
                };
                let Some(handed) = h.recv(from) else {
                    break;
                };
                n += 1;
                let meta = (handed.kind, handed.port, handed.csum);
                match self.xsk.adopt(handed.frame, &mut self.batch) {
                    Ok(()) => self.handed.push(meta),
                    Err(e) => {
                        let full = matches!(e.reason, LentRefusal::BatchFull);
                        let frame = e.frame;
                        if !full {
                            let _ = self.xsk.reclaim(frame);
                            tally.drops.add(AgentDrop::NoSocket);
                            continue;
                        }
                        // The batch is full: finish it, then adopt into the next.
                        self.finish_handed(snapshot, now_ns, tally);
                        match self.xsk.adopt(frame, &mut self.batch) {
                            Ok(()) => self.handed.push(meta),
                            Err(e) => {
                                let _ = self.xsk.reclaim(e.frame);
                                tally.drops.add(AgentDrop::NoSocket);
                            }
                        }
                    }
                }
            }
        }
        self.finish_handed(snapshot, now_ns, tally);
        n
    }

    /// Process, act on and complete the adopted frames in the batch (`self.handed` says what
    /// each is).
    fn finish_handed(&mut self, snapshot: &Snapshot, now_ns: u64, tally: &mut RoundTally) {
        if self.handed.is_empty() {
            return;
        }
        self.outcomes.clear();
        {
            let tables = &snapshot.tables;
            for (fm, &(kind, port, csum)) in self.xsk.frames(&mut self.batch).zip(&self.handed) {
                let (chunk, off, len, conts) = fm.into_parts();
                let o = match kind {
                    HandoffKind::Transmit => Outcome {
                        verdict: Verdict::Forward(port),
                        off,
                        len,
                        csum,
                        absorbed: false,
                    },
                    HandoffKind::Process => {
                        let tail: ArrayVec<&[u8], MAX_SEGMENTS> = conts.collect();
                        let mut frame = Frame::new(chunk, off, len).with_tail(&tail);
                        let verdict = process(tables, &mut self.state, now_ns, port, &mut frame);
                        Outcome {
                            verdict,
                            off: frame.offset(),
                            len: frame.len(),
                            csum: frame.tx_checksum(),
                            absorbed: false,
                        }
                    }
                };
                self.outcomes.push(o);
            }
        }
        for i in 0..self.outcomes.len() {
            let o = self.outcomes[i];
            let (kind, port, _) = self.handed[i];
            self.act(i, port, o, kind == HandoffKind::Process, snapshot, tally);
        }
        self.handed.clear();
        if let Err(e) = self.xsk.complete(&mut self.batch) {
            tracing::debug!("complete: {e}");
        }
    }
}

/// Build into `scratch` the ICMP "fragmentation needed" answering `frame` for `mtu`, from this
/// node's VTEP address; its length, or `None` when the frame gets no answer (an ICMP error
/// itself, a broadcast source: dropped, counted by the pipeline as fragmentation_needed).
fn frag_answer(
    frame: &Frame<'_>,
    mtu: u16,
    tables: &Tables,
    state: &mut WorkerState,
    scratch: &mut [u8],
) -> Option<usize> {
    let id = state.next_ip_id();
    segment::frag_needed(frame, mtu, tables.node.vtep_ip.octets(), id, scratch).ok()
}

/// Count a send that could not be queued.
fn count_send_error(e: SendError, drops: &mut AgentDropCounts) {
    match e {
        SendError::QueueFull | SendError::NoFreeChunks => drops.add(AgentDrop::TxFull),
        SendError::TooLarge => drops.add(AgentDrop::TooLarge),
        SendError::Empty | SendError::NoSuchSocket => drops.add(AgentDrop::NoSocket),
    }
}

/// Queue copies of `pieces` of `buf` on our socket `id`, counting what could not be queued.
fn send_pieces(
    xsk: &mut Xsk,
    id: SocketId,
    buf: &[u8],
    pieces: &[(usize, usize)],
    drops: &mut AgentDropCounts,
) {
    for &(at, len) in pieces {
        let Some(data) = buf.get(at..at + len) else {
            drops.add(AgentDrop::TooLarge);
            continue;
        };
        if let Err(e) = xsk.send_copy(id, &[data]) {
            count_send_error(e, drops);
        }
    }
}

/// Copy a frame to worker `to` (counted in `handoffs`, or dropped with its reason).
fn hand_off(
    h: &mut Handoff,
    to: usize,
    kind: HandoffKind,
    port: PortId,
    csum: Option<TxChecksum>,
    parts: &[&[u8]],
    tally: &mut RoundTally,
) {
    match h.send(to, kind, port, csum, parts) {
        Ok(()) => tally.handoffs += 1,
        Err(HandoffError::Full) => tally.drops.add(AgentDrop::HandoffFull),
        Err(HandoffError::TooLarge) => tally.drops.add(AgentDrop::TooLarge),
        Err(HandoffError::NoPeer) => tally.drops.add(AgentDrop::NoSocket),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_umem_holds_every_pods_share() {
        let plan = UmemPlan::for_pods(110);
        assert_eq!(plan.frames, 23552);
        assert_eq!(plan.bytes(), 92 << 20, "92 MiB per worker for 110 pods");
        for pods in [1, 40, 110, 250, 2048] {
            let plan = UmemPlan::for_pods(pods);
            let lent = crate::handoff::lend_per_peer(plan.frames as usize, 2) as u32;
            assert!(
                FILL_RING + pods * POD_FILL + plan.fill_boost + TX_RESERVE + lent <= plan.frames,
                "{pods} pods overcommit {plan:?}"
            );
            assert_eq!(plan.frames % 1024, 0);
        }
    }
}
