//! The whole path of a frame through a worker: [`process`] and its batch form [`process_batch`].
//!
//! Order (DESIGN, "A packet's way"):
//! 1. On the uplink, VXLAN to this node is decapsulated (`vxlan`); other uplink traffic is only
//!    ours if it belongs to a tracked flow or addresses a NodePort, else it goes to the kernel.
//! 2. `parse` validates and extracts the tuple; frames from a pod port must carry that pod's
//!    source address.
//! 3. Partial L4 checksums are completed (`checksum::complete_partial`).
//! 4. `conntrack` lookup: a packet of a known flow is accounted (TCP state machine), translated as
//!    its entry says (DNAT original / reverse NAT replies) and routed; policy is not consulted. A
//!    TCP SYN that meets a closed connection (TIME_WAIT or CLOSE) ends that entry and goes on as a
//!    new flow (as Linux conntrack does), so reusing a 5-tuple never skips step 5.
//! 5. A new flow: `service` (ClusterIP or NodePort, Maglev, affinity) gives the translated tuple;
//!    NodePort flows are also SNATed to this node's VTEP address (as kube-proxy does with
//!    externalTrafficPolicy=Cluster), with a free source port; `route` must know the destination;
//!    NetworkPolicy decides on the translated destination (and the original client address); the
//!    flow is recorded in conntrack under its original and reply keys; then NAT and route.
//! 6. ICMP errors are matched to the flow of the datagram they carry and translated with it.
//!
//! Every frame is counted once in [`WorkerState::counters`] (rx, and tx, passed or drops by
//! reason), with its bytes in and, when forwarded, out.
//!
//! With [`WorkerState::events`] set, flow events go into that sink (see [`crate::events`]): a new
//! connection (service and backend after DNAT, egress port, policy verdict), a policy denial, every
//! other drop with its reason, and connection end with its counts (a TCP close or reset as it
//! happens; any other flow when [`WorkerState::expire`], called by the worker between batches,
//! removes its expired entry). Without it nothing is emitted and the only cost is one `is_some`
//! test per drop, new flow and TCP packet.
//!
//! Conntrack is per worker: both directions of a flow must reach the same worker, or replies miss
//! their entry. [`crate::steer::owner`] names that worker; NodePort SNAT takes its source port
//! from the worker's share ([`WorkerState::steer`]) so replies name it too.

use crate::checksum;
use crate::conntrack::{ConnTrack, CtConfig, CtEntry, CtError, CtHandle, CtState, CtView, FlowDir};
use crate::events::{EventKind, EventSink, FlowCounts, FlowEvent};
use crate::flow::FlowKey;
use crate::flow::proto;
use crate::frame::{Frame, TxChecksum};
use crate::nat;
use crate::parse::{self, IcmpKind, L3_OFFSET, ParseOutcome, Parsed};
use crate::policy::{Direction, PolicyQuery, PolicyVerdict};
use crate::route::{self, Route};
use crate::service::{self, AffinityTable, ServiceOutcome};
use crate::steer::{self, Steer};
use crate::tables::{ServiceId, Tables};
use crate::trace::{CtStep, TraceSink, TraceStep};
use crate::verdict::{Counters, DropReason, PortId, Verdict};
use crate::vxlan::{self, VxlanError};
use crate::wire::ethernet::Mac;

/// What conntrack keeps per flow besides its two keys (the original tuple, and the reply tuple
/// which is the reversed translated tuple).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowNat {
    /// The service the flow was balanced to, if any.
    pub service: Option<ServiceId>,
    /// For flows that entered from outside the cluster (NodePort): the MAC their first packet came
    /// from on the uplink, where replies go back to.
    pub peer_mac: Option<Mac>,
}

/// Sizes of a worker's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerConfig {
    pub conntrack: CtConfig,
    /// Slots of the sessionAffinity table.
    pub affinity_capacity: usize,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            conntrack: CtConfig::default(),
            affinity_capacity: 1 << 14,
        }
    }
}

/// Everything one worker owns and mutates: conntrack, the affinity table, counters. Allocated once
/// by [`WorkerState::new`]; processing never allocates.
#[derive(Debug)]
pub struct WorkerState {
    pub conntrack: ConnTrack<FlowNat>,
    pub affinity: AffinityTable,
    pub counters: Counters,
    /// Where flow events go; `None`: no events.
    pub events: Option<Box<dyn EventSink>>,
    ip_id: u16,
    /// Bumped by every conntrack insert or removal of the pipeline (batch lookups compare it).
    ct_epoch: u64,
    /// This worker's place among the node's workers: NodePort SNAT ports come from its share
    /// (see [`crate::steer`]).
    pub steer: Steer,
    /// When [`WorkerState::expire_due`] sweeps next.
    next_expire_ns: u64,
    /// The transmitter completes L4 checksums on request (AF_XDP TX metadata): a partial checksum
    /// for a local pod is then left partial and requested on the frame
    /// ([`Frame::tx_checksum`]) instead of being computed here.
    pub tx_checksum_offload: bool,
}

/// How often [`WorkerState::expire_due`] sweeps conntrack.
pub const EXPIRE_INTERVAL_NS: u64 = 100_000_000;
/// Conntrack pool slots one sweep visits (a default 65536-entry table is swept whole in 1.6 s).
pub const EXPIRE_BUDGET: usize = 4096;

impl WorkerState {
    pub fn new(config: WorkerConfig) -> Self {
        Self {
            conntrack: ConnTrack::new(config.conntrack),
            affinity: AffinityTable::new(config.affinity_capacity),
            counters: Counters::default(),
            events: None,
            ip_id: 0,
            ct_epoch: 0,
            steer: Steer::default(),
            next_expire_ns: 0,
            tx_checksum_offload: false,
        }
    }

    /// Remove expired conntrack entries among the next `budget` pool slots (see
    /// [`ConnTrack::expire`]). With events on, each removed flow that had not ended already (a TCP
    /// close or reset emits its end when it happens) gets its [`EventKind::ConnectionEnd`] with
    /// packet and byte counts. Returns the entries removed. No allocation, bounded work.
    pub fn expire(&mut self, now_ns: u64, budget: usize) -> usize {
        let events = &mut self.events;
        let n = self.conntrack.expire_each(now_ns, budget, |e| {
            if let Some(p) = events.as_mut()
                && !matches!(e.state(), CtState::TcpClose | CtState::TcpTimeWait)
            {
                p.emit(end_event(e, now_ns, PortId(0)));
            }
        });
        if n > 0 {
            self.ct_epoch += 1;
        }
        n
    }

    /// [`WorkerState::expire`] with [`EXPIRE_BUDGET`] once every [`EXPIRE_INTERVAL_NS`]; a no-op
    /// (one comparison) in between. For the worker to call every round, busy or idle.
    pub fn expire_due(&mut self, now_ns: u64) -> usize {
        if now_ns < self.next_expire_ns {
            return 0;
        }
        self.next_expire_ns = now_ns.saturating_add(EXPIRE_INTERVAL_NS);
        self.expire(now_ns, EXPIRE_BUDGET)
    }

    /// Emit an event when events are on.
    #[inline]
    fn emit(&mut self, ev: impl FnOnce() -> FlowEvent) {
        if let Some(p) = self.events.as_mut() {
            p.emit(ev());
        }
    }

    /// The next IPv4 identification for a header this worker writes (VXLAN outer headers,
    /// ICMP errors).
    pub fn next_ip_id(&mut self) -> u16 {
        self.ip_id = self.ip_id.wrapping_add(1);
        self.ip_id
    }
}

/// Run one frame through the pipeline. `ingress` is the port it arrived on; `now_ns` a monotonic
/// time in nanoseconds. The frame is rewritten in place (and may grow into its headroom for VXLAN
/// encap or shrink for decap); the verdict is counted. Never steers: this is the path for frames
/// another worker handed to this one (and for tests).
pub fn process(
    tables: &Tables,
    state: &mut WorkerState,
    now_ns: u64,
    ingress: PortId,
    frame: &mut Frame<'_>,
) -> Verdict {
    let rx = frame.total_len();
    let mut cx = Ctx {
        t: tables,
        s: state,
        now: now_ns,
        ingress,
    };
    let v = cx.run(frame);
    cx.s.counters.count_frame(v, rx, frame.total_len());
    v
}

/// Trace one frame: run it through the pipeline as [`process`] would on this worker now (the same
/// stage code, never steering), handing every stage's decision to `sink` (see [`crate::trace`]),
/// and return the verdict [`process`] would give. The frame is rewritten as `process` would
/// rewrite it (so a frame forwarded to another node leaves VXLAN-encapsulated, ready to be traced
/// there).
///
/// The worker's state is only read (`&WorkerState`): conntrack through a [`CtView`] (what the
/// packet would change, an entry's state or a new entry, stays in the view), the affinity table
/// without refreshing it; no counter, flow event, IPv4 identification or NodePort SNAT port is
/// taken.
pub fn trace(
    tables: &Tables,
    state: &WorkerState,
    now_ns: u64,
    ingress: PortId,
    frame: &mut Frame<'_>,
    sink: &mut dyn TraceSink,
) -> Verdict {
    let mut view = TraceView {
        base: state,
        ct: CtView::new(&state.conntrack),
        ip_id: state.ip_id,
        sink,
    };
    let mut cx = Ctx {
        t: tables,
        s: &mut view,
        now: now_ns,
        ingress,
    };
    let v = cx.run(frame);
    view.sink.step(TraceStep::Verdict(v));
    v
}

/// Frames [`process_batch`] takes through each stage together (its conntrack lookups are issued
/// as one [`ConnTrack::lookup_batch`] so their cache misses overlap).
pub const BATCH: usize = 64;

/// The pipeline over a batch of frames received on one port, writing one verdict per frame into
/// `verdicts` (frames beyond `verdicts.len()` are left unprocessed).
///
/// With one worker ([`WorkerState::steer`]), the same verdicts and rewrites as [`process`] on each
/// frame in order. With several, a frame whose connection another worker owns
/// ([`crate::steer::owner`], computed from the parsed headers) gets [`Verdict::Steer`] with that
/// worker and is not otherwise processed: its bytes are as they arrived (only its window may have
/// moved, so the caller hands off the frame as received), and it is counted in
/// [`Counters::steered`], not `rx`.
pub fn process_batch(
    tables: &Tables,
    state: &mut WorkerState,
    now_ns: u64,
    ingress: PortId,
    frames: &mut [Frame<'_>],
    verdicts: &mut [Verdict],
) {
    let n = frames.len().min(verdicts.len());
    let mut cx = Ctx {
        t: tables,
        s: state,
        now: now_ns,
        ingress,
    };
    for (frames, verdicts) in frames[..n]
        .chunks_mut(BATCH)
        .zip(verdicts[..n].chunks_mut(BATCH))
    {
        let mut preps: [Option<Prepared>; BATCH] = [None; BATCH];
        let mut keys = [FlowKey::default(); BATCH];
        let mut found = [None; BATCH];
        let mut nkeys = 0;
        let mut rx = [0usize; BATCH];
        for (i, f) in frames.iter_mut().enumerate() {
            rx[i] = f.total_len();
            match cx.prepare_steered(f) {
                Ok(p) => {
                    if p.tracked_key {
                        keys[nkeys] = p.parsed.key();
                        nkeys += 1;
                    }
                    preps[i] = Some(p);
                }
                Err(v) => verdicts[i] = v,
            }
        }
        cx.s.conntrack
            .lookup_batch(&keys[..nkeys], now_ns, &mut found[..nkeys]);
        let epoch = cx.s.ct_epoch;
        let mut k = 0;
        for (i, f) in frames.iter_mut().enumerate() {
            if let Some(p) = preps[i] {
                let hint = if p.tracked_key {
                    k += 1;
                    match found[k - 1] {
                        Some((h, dir)) => CtHint::Found(h, dir),
                        None => CtHint::Missing { epoch },
                    }
                } else {
                    CtHint::Unknown
                };
                verdicts[i] = cx.finish(f, p, hint);
            }
            cx.s.counters.count_frame(verdicts[i], rx[i], f.total_len());
        }
    }
}

/// A frame that passed decap, parse and the source check, on its way to conntrack.
#[derive(Clone, Copy, Debug)]
struct Prepared {
    parsed: Parsed,
    /// Arrived on the uplink from outside the cluster (not VXLAN).
    external: bool,
    /// Looked up in conntrack by its own tuple (all but ICMP errors).
    tracked_key: bool,
}

/// What is known of a frame's conntrack entry before the conntrack stage runs.
#[derive(Clone, Copy, Debug)]
enum CtHint {
    /// Not looked up: look it up.
    Unknown,
    /// A batch lookup found this entry; it stands if the entry still holds the frame's key (an
    /// earlier frame of the batch may have removed it).
    Found(CtHandle, FlowDir),
    /// A batch lookup found nothing at conntrack epoch `epoch`; it stands if no earlier frame of
    /// the batch inserted or removed an entry since.
    Missing { epoch: u64 },
}

/// What the stages read and change of a worker's state: the worker's own [`WorkerState`] when
/// processing, a [`TraceView`] of it when tracing. One stage code serves both (monomorphized, so
/// the worker's path compiles as if the trait were not there: its `record` is empty and
/// `TRACING` a constant `false`).
trait StageState {
    /// Whether steps are recorded (work done only to describe a step is skipped otherwise).
    const TRACING: bool;
    fn ct_lookup(&mut self, key: &FlowKey, now: u64) -> Option<(CtHandle, FlowDir)>;
    fn ct_get(&self, h: CtHandle) -> Option<&CtEntry<FlowNat>>;
    fn ct_on_packet(
        &mut self,
        h: CtHandle,
        dir: FlowDir,
        tcp_flags: Option<u8>,
        bytes: u32,
        now: u64,
    ) -> Option<CtState>;
    fn ct_remove(&mut self, h: CtHandle);
    fn ct_insert(
        &mut self,
        orig: FlowKey,
        reply: FlowKey,
        value: FlowNat,
        now: u64,
    ) -> Result<CtHandle, CtError>;
    /// Bumped by every conntrack insert or removal (batch lookups compare it).
    fn ct_epoch(&self) -> u64;
    fn bump_ct_epoch(&mut self);
    /// The service stage ([`service::select`]).
    fn select_service(
        &mut self,
        t: &Tables,
        now: u64,
        p: &Parsed,
        external: bool,
    ) -> ServiceOutcome;
    fn steer(&self) -> Steer;
    fn next_ip_id(&mut self) -> u16;
    fn tx_checksum_offload(&self) -> bool;
    fn events_on(&self) -> bool;
    fn emit(&mut self, ev: impl FnOnce() -> FlowEvent);
    /// Record a step of a trace.
    fn record(&mut self, step: impl FnOnce() -> TraceStep);
}

impl StageState for WorkerState {
    const TRACING: bool = false;
    #[inline(always)]
    fn ct_lookup(&mut self, key: &FlowKey, now: u64) -> Option<(CtHandle, FlowDir)> {
        self.conntrack.lookup(key, now)
    }
    #[inline(always)]
    fn ct_get(&self, h: CtHandle) -> Option<&CtEntry<FlowNat>> {
        self.conntrack.get(h)
    }
    #[inline(always)]
    fn ct_on_packet(
        &mut self,
        h: CtHandle,
        dir: FlowDir,
        tcp_flags: Option<u8>,
        bytes: u32,
        now: u64,
    ) -> Option<CtState> {
        self.conntrack.on_packet(h, dir, tcp_flags, bytes, now)
    }
    #[inline(always)]
    fn ct_remove(&mut self, h: CtHandle) {
        self.conntrack.remove(h);
    }
    #[inline(always)]
    fn ct_insert(
        &mut self,
        orig: FlowKey,
        reply: FlowKey,
        value: FlowNat,
        now: u64,
    ) -> Result<CtHandle, CtError> {
        self.conntrack.insert(orig, reply, value, now)
    }
    #[inline(always)]
    fn ct_epoch(&self) -> u64 {
        self.ct_epoch
    }
    #[inline(always)]
    fn bump_ct_epoch(&mut self) {
        self.ct_epoch += 1;
    }
    #[inline(always)]
    fn select_service(
        &mut self,
        t: &Tables,
        now: u64,
        p: &Parsed,
        external: bool,
    ) -> ServiceOutcome {
        service::select(t, &mut self.affinity, now, p, external)
    }
    #[inline(always)]
    fn steer(&self) -> Steer {
        self.steer
    }
    #[inline(always)]
    fn next_ip_id(&mut self) -> u16 {
        WorkerState::next_ip_id(self)
    }
    #[inline(always)]
    fn tx_checksum_offload(&self) -> bool {
        self.tx_checksum_offload
    }
    #[inline(always)]
    fn events_on(&self) -> bool {
        self.events.is_some()
    }
    #[inline(always)]
    fn emit(&mut self, ev: impl FnOnce() -> FlowEvent) {
        WorkerState::emit(self, ev);
    }
    #[inline(always)]
    fn record(&mut self, _: impl FnOnce() -> TraceStep) {}
}

/// A worker's state as a trace sees it: read, never written (see [`trace`]).
struct TraceView<'a, 'k> {
    base: &'a WorkerState,
    ct: CtView<'a, FlowNat>,
    /// The identification the next header would take (a copy: the worker's stays).
    ip_id: u16,
    sink: &'k mut dyn TraceSink,
}

impl StageState for TraceView<'_, '_> {
    const TRACING: bool = true;
    fn ct_lookup(&mut self, key: &FlowKey, now: u64) -> Option<(CtHandle, FlowDir)> {
        self.ct.lookup(key, now)
    }
    fn ct_get(&self, h: CtHandle) -> Option<&CtEntry<FlowNat>> {
        self.ct.get(h)
    }
    fn ct_on_packet(
        &mut self,
        h: CtHandle,
        dir: FlowDir,
        tcp_flags: Option<u8>,
        bytes: u32,
        now: u64,
    ) -> Option<CtState> {
        self.ct.on_packet(h, dir, tcp_flags, bytes, now)
    }
    fn ct_remove(&mut self, h: CtHandle) {
        self.ct.remove(h);
    }
    fn ct_insert(
        &mut self,
        orig: FlowKey,
        reply: FlowKey,
        value: FlowNat,
        now: u64,
    ) -> Result<CtHandle, CtError> {
        self.ct.insert(orig, reply, value, now)
    }
    fn ct_epoch(&self) -> u64 {
        0
    }
    fn bump_ct_epoch(&mut self) {}
    fn select_service(
        &mut self,
        t: &Tables,
        now: u64,
        p: &Parsed,
        external: bool,
    ) -> ServiceOutcome {
        let c = service::choose(t, &self.base.affinity, now, p, external);
        self.sink.step(TraceStep::Service {
            svc: c.svc,
            outcome: c.outcome,
            how: c.how,
        });
        c.outcome
    }
    fn steer(&self) -> Steer {
        self.base.steer
    }
    fn next_ip_id(&mut self) -> u16 {
        self.ip_id = self.ip_id.wrapping_add(1);
        self.ip_id
    }
    fn tx_checksum_offload(&self) -> bool {
        self.base.tx_checksum_offload
    }
    fn events_on(&self) -> bool {
        false
    }
    fn emit(&mut self, _: impl FnOnce() -> FlowEvent) {}
    fn record(&mut self, step: impl FnOnce() -> TraceStep) {
        self.sink.step(step());
    }
}

/// What every stage of one frame's way reads: the tables, the worker's state (or a trace's view
/// of it), the time and the port the frame arrived on.
struct Ctx<'a, S: StageState> {
    t: &'a Tables,
    s: &'a mut S,
    now: u64,
    ingress: PortId,
}

impl<S: StageState> Ctx<'_, S> {
    /// The whole way of one frame that is not steered: the verdict.
    #[inline]
    fn run(&mut self, frame: &mut Frame<'_>) -> Verdict {
        match self.prepare(frame) {
            Ok(p) => self.finish(frame, p, CtHint::Unknown),
            Err(v) => v,
        }
    }

    /// A drop event for a frame that did not reach conntrack (`key` when it parsed).
    fn drop_early(&mut self, r: DropReason, key: Option<FlowKey>) -> Verdict {
        let (now, ingress) = (self.now, self.ingress);
        self.s.emit(|| FlowEvent {
            tuple: key,
            drop: Some(r),
            ..FlowEvent::new(EventKind::Drop, now, ingress)
        });
        Verdict::Drop(r)
    }

    /// Decap and parse: the frame's inner packet (`Ok`), or the final verdict.
    fn decap_and_parse(&mut self, frame: &mut Frame<'_>) -> Result<(Parsed, bool), Verdict> {
        let t = self.t;
        let mut tunneled = false;
        if self.ingress == t.node.uplink
            && vxlan::is_vxlan_to(frame.head(), t.node.underlay_ip.octets(), t.node.vxlan_port)
        {
            let from = if S::TRACING {
                outer_source(frame.head())
            } else {
                [0; 4]
            };
            if let Err(e) = vxlan::decap(frame, t.node.vni) {
                let r = match e {
                    VxlanError::BadChecksum => DropReason::VxlanBadChecksum,
                    VxlanError::WrongVni => DropReason::VxlanWrongVni,
                    VxlanError::Malformed | VxlanError::NoHeadroom => DropReason::VxlanMalformed,
                };
                self.s.record(|| TraceStep::Decap {
                    from,
                    result: Err(r),
                });
                return Err(self.drop_early(r, None));
            }
            self.s.record(|| TraceStep::Decap {
                from,
                result: Ok(()),
            });
            tunneled = true;
        }
        match parse::parse(t, frame) {
            ParseOutcome::Ipv4(p) => {
                self.s.record(|| TraceStep::Parsed {
                    key: p.key(),
                    tcp_flags: p.tcp_flags,
                    ip_len: p.ip_len,
                    ttl: p.ttl,
                    icmp: p.icmp,
                });
                Ok((p, tunneled))
            }
            ParseOutcome::Done(v) => {
                self.s.record(|| TraceStep::NotParsed(v));
                match v {
                    Verdict::Drop(r) => Err(self.drop_early(r, None)),
                    v => Err(v),
                }
            }
        }
    }

    /// The source check and partial checksum completion, after parse.
    fn admit(
        &mut self,
        frame: &mut Frame<'_>,
        p: Parsed,
        tunneled: bool,
    ) -> Result<Prepared, Verdict> {
        let uplink = self.ingress == self.t.node.uplink;
        if !uplink
            && self
                .t
                .local_pod(p.src)
                .is_none_or(|pod| pod.port != self.ingress)
        {
            self.s.record(|| TraceStep::Source {
                pod: true,
                spoofed: true,
                external: false,
                partial: false,
            });
            return Err(self.drop_early(DropReason::SpoofedSource, Some(p.key())));
        }
        let icmp_error = matches!(p.icmp, IcmpKind::Error { .. });
        let mut p = p;
        // Completed (or not) once the route is known: see `settle_checksum`.
        p.csum_partial = !icmp_error && checksum::is_partial(frame, &p);
        self.s.record(|| TraceStep::Source {
            pod: !uplink,
            spoofed: false,
            external: uplink && !tunneled,
            partial: p.csum_partial,
        });
        Ok(Prepared {
            parsed: p,
            external: uplink && !tunneled,
            tracked_key: !icmp_error,
        })
    }

    /// Decap, parse, source check and partial checksum completion: everything before conntrack.
    fn prepare(&mut self, frame: &mut Frame<'_>) -> Result<Prepared, Verdict> {
        let (p, tunneled) = self.decap_and_parse(frame)?;
        self.admit(frame, p, tunneled)
    }

    /// [`Self::prepare`], stopping with [`Verdict::Steer`] after parse for a frame whose
    /// connection another worker owns (before anything but its window changed).
    fn prepare_steered(&mut self, frame: &mut Frame<'_>) -> Result<Prepared, Verdict> {
        let (p, tunneled) = self.decap_and_parse(frame)?;
        let me = self.s.steer();
        if me.workers > 1 {
            let key = match p.icmp {
                // The datagram an error is about went the other way.
                IcmpKind::Error { .. } => nat::embedded_tuple(frame, &p).map(|e| e.reversed()),
                _ => Some(p.key()),
            };
            if let Some(key) = key {
                let owner = steer::owner_of(self.t, &key, usize::from(me.workers));
                if owner != usize::from(me.worker) {
                    return Err(Verdict::Steer(owner as u16));
                }
            }
        }
        self.admit(frame, p, tunneled)
    }

    /// Conntrack onwards; emits the drop event of any drop but a policy denial (`new_flow` emits
    /// that with its verdict).
    fn finish(&mut self, frame: &mut Frame<'_>, prep: Prepared, hint: CtHint) -> Verdict {
        let v = self.track(frame, prep, hint);
        if let Verdict::Drop(r) = v
            && !matches!(
                r,
                DropReason::PolicyDeniedEgress | DropReason::PolicyDeniedIngress
            )
        {
            let (now, ingress) = (self.now, self.ingress);
            self.s.emit(|| FlowEvent {
                tuple: Some(prep.parsed.key()),
                drop: Some(r),
                ..FlowEvent::new(EventKind::Drop, now, ingress)
            });
        }
        v
    }

    /// The conntrack stage: a packet of a known flow is accounted and translated as its entry
    /// says; anything else goes to [`Self::new_flow`].
    fn track(&mut self, frame: &mut Frame<'_>, prep: Prepared, hint: CtHint) -> Verdict {
        let mut p = prep.parsed;
        if !prep.tracked_key {
            return self.icmp_error(frame, &mut p);
        }
        let key = p.key();
        let s = &mut *self.s;
        let hit = match hint {
            CtHint::Found(h, dir) if s.ct_get(h).is_some_and(|e| *e.key(dir) == key) => {
                Some((h, dir))
            }
            CtHint::Missing { epoch } if epoch == s.ct_epoch() => None,
            _ => s.ct_lookup(&key, self.now),
        };
        let tcp_flags = (p.proto == proto::TCP).then_some(p.tcp_flags);
        let Some((h, dir)) = hit else {
            s.record(|| TraceStep::Conntrack(CtStep::Miss));
            return self.new_flow(frame, p, prep.external, tcp_flags);
        };
        if let Some(e) = s.ct_get(h).filter(|e| e.is_reopened_by(tcp_flags)) {
            // A SYN over a closed connection (TIME_WAIT or CLOSE, either way) opens a new one: the
            // old entry goes (its end was emitted when it closed; a NodePort SNAT port is freed)
            // and the packet takes the new-flow path, so service, NAT and policy are decided anew.
            let entry = *e;
            s.record(|| TraceStep::Conntrack(CtStep::Reopened { entry }));
            s.ct_remove(h);
            s.bump_ct_epoch();
            return self.new_flow(frame, p, prep.external, tcp_flags);
        }
        let before = match tcp_flags {
            Some(_) if s.events_on() => s.ct_get(h).map(|e| e.state()),
            _ => None,
        };
        let entry = if S::TRACING {
            s.ct_get(h).copied()
        } else {
            None
        };
        let after = s.ct_on_packet(h, dir, tcp_flags, u32::from(p.ip_len), self.now);
        if let (Some(entry), Some(after)) = (entry, after) {
            s.record(|| TraceStep::Conntrack(CtStep::Hit { dir, entry, after }));
        }
        match after {
            None | Some(CtState::Invalid) => return Verdict::Drop(DropReason::ConntrackInvalid),
            Some(after) => {
                if let Some(before) = before
                    && before != after
                    && matches!(after, CtState::TcpClose | CtState::TcpTimeWait)
                {
                    self.emit_end(h);
                }
            }
        }
        let Some(e) = self.s.ct_get(h) else {
            return Verdict::Drop(DropReason::ConntrackInvalid);
        };
        let to = e.key(dir.flip()).reversed();
        let peer_mac = e.value().peer_mac;
        let r = route::lookup(self.t, to.dst);
        self.s.record(|| TraceStep::Route {
            dst: to.dst,
            route: r,
        });
        if route::needs_frag_answer(self.t, &p, &r) {
            return Verdict::FragNeeded(self.t.vxlan_mtu);
        }
        self.settle_checksum(frame, &mut p, &r);
        if to != key {
            self.s.record(|| TraceStep::Nat {
                from: key,
                to,
                snat: false,
            });
            nat::rewrite(frame, &mut p, &to);
        }
        if let (FlowDir::Reply, Some(mac), Route::Kernel) = (dir, peer_mac, r) {
            return route::forward_external(self.t, frame, &p, mac);
        }
        let v = route::forward(self.t, frame, &p, r, self.s.next_ip_id());
        request_checksum(frame, &p, v);
        v
    }

    /// What becomes of a partial L4 checksum now that the route is known: left partial for a
    /// local pod when the transmitter completes it on request (requested with the verdict, see
    /// [`request_checksum`]); left to the segmenter for a TCP frame it will cut for VXLAN (it sums
    /// every segment anyway); computed here for everything else (other nodes, the kernel,
    /// outside clients), before NAT changes the packet.
    fn settle_checksum(&self, frame: &mut Frame<'_>, p: &mut Parsed, r: &Route) {
        if !p.csum_partial {
            return;
        }
        let offloaded = matches!(r, Route::Local(_)) && self.s.tx_checksum_offload();
        let segmented =
            matches!(r, Route::Remote(_)) && p.proto == proto::TCP && p.ip_len > self.t.vxlan_mtu;
        if !offloaded && !segmented {
            checksum::complete_partial(frame, p);
            p.csum_partial = false;
        }
    }

    /// A TCP flow closed: its end event with counts.
    fn emit_end(&mut self, h: CtHandle) {
        let Some(e) = self.s.ct_get(h) else {
            return;
        };
        let ev = end_event(e, self.now, self.ingress);
        self.s.emit(|| ev);
    }

    /// The first packet of a flow: service selection, NAT, route, policy, conntrack insert.
    fn new_flow(
        &mut self,
        frame: &mut Frame<'_>,
        mut p: Parsed,
        external: bool,
        tcp_flags: Option<u8>,
    ) -> Verdict {
        let (t, now, ingress) = (self.t, self.now, self.ingress);
        let s = &mut *self.s;
        let orig = p.key();
        let mut xlat = orig;
        let mut value = FlowNat::default();
        let mut snat = false;
        match s.select_service(t, now, &p, external) {
            ServiceOutcome::NotService if external => return Verdict::PassToKernel,
            ServiceOutcome::NotService => {}
            ServiceOutcome::NoBackend => return Verdict::Drop(DropReason::NoBackend),
            ServiceOutcome::Backend {
                svc,
                ip,
                port,
                node_port,
            } => {
                xlat.dst = ip;
                xlat.dst_port = port;
                value.service = Some(svc);
                if node_port {
                    snat = true;
                    xlat.src = t.node.vtep_ip.octets();
                    // From this worker's share of the port space, so replies are steered back.
                    xlat.src_port = s.steer().snat_port(xlat.src_port);
                    value.peer_mac = Some(p.src_mac);
                }
            }
        }
        if p.proto == proto::ICMP {
            // An echo's identifier stands in both ports.
            xlat.dst_port = xlat.src_port;
        }
        let r = route::lookup(t, xlat.dst);
        s.record(|| TraceStep::Route {
            dst: xlat.dst,
            route: r,
        });
        if let Route::NoRoute = r {
            return Verdict::Drop(DropReason::NoRoute);
        }
        let q = PolicyQuery {
            src: orig.src.into(),
            dst: xlat.dst.into(),
            proto: p.proto,
            dst_port: if p.proto == proto::ICMP {
                0
            } else {
                xlat.dst_port
            },
        };
        let decision = t.policy.decide(&q);
        s.record(|| TraceStep::Policy {
            query: q,
            verdict: decision,
        });
        if let PolicyVerdict::Deny { direction } = decision {
            let r = match direction {
                Direction::Egress => DropReason::PolicyDeniedEgress,
                Direction::Ingress => DropReason::PolicyDeniedIngress,
            };
            s.emit(|| FlowEvent {
                tuple: Some(orig),
                translated: Some(xlat),
                service: value.service,
                policy: Some(decision),
                drop: Some(r),
                ..FlowEvent::new(EventKind::PolicyVerdict, now, ingress)
            });
            return Verdict::Drop(r);
        }
        if let Route::Kernel = r {
            // Host-bound or leaving the cluster, and allowed: the kernel routes (and masquerades)
            // it; untracked. Such frames reach a worker only from pods whose egress policy the XDP
            // program sends everything of (the rest it passes itself).
            if p.csum_partial {
                checksum::complete_partial(frame, &p);
            }
            return Verdict::PassToKernel;
        }
        if route::needs_frag_answer(t, &p, &r) {
            // Not tracked: the sender retries smaller, and that packet opens the flow.
            return Verdict::FragNeeded(t.vxlan_mtu);
        }
        s.bump_ct_epoch();
        let mut inserted = s.ct_insert(orig, xlat.reversed(), value, now);
        // Another connection holds the reply tuple: another client behind the same SNAT address,
        // or this client with the same source port towards the same backend both directly and
        // through a Service (a kernel picks ephemeral ports per destination, so both happen, and
        // a closed one lingers in TIME_WAIT). Take another source port towards the backend, as
        // Linux NAT does for a clashing tuple (`get_unique_tuple`); replies are translated back.
        let remappable = matches!(p.proto, proto::TCP | proto::UDP | proto::ICMP);
        if inserted == Err(CtError::Exists) && (snat || remappable) {
            let h = orig.hash64();
            let mut i = 0u64;
            while inserted == Err(CtError::Exists) && i < 16 {
                i += 1;
                let port = s.steer().snat_port(
                    1024 + ((h.wrapping_add(i.wrapping_mul(0x9e37_79b9))) % 64511) as u16,
                );
                xlat.src_port = port;
                if p.proto == proto::ICMP {
                    xlat.dst_port = port;
                }
                inserted = s.ct_insert(orig, xlat.reversed(), value, now);
            }
        }
        s.record(|| {
            TraceStep::Conntrack(CtStep::Insert {
                orig,
                reply: xlat.reversed(),
                result: inserted.map(|_| ()),
            })
        });
        let h = match inserted {
            Ok(h) => h,
            Err(CtError::Full) => return Verdict::Drop(DropReason::ConntrackFull),
            Err(CtError::Exists) if snat => return Verdict::Drop(DropReason::NatPortExhausted),
            Err(CtError::Exists) => return Verdict::Drop(DropReason::ConntrackInvalid),
        };
        match s.ct_on_packet(h, FlowDir::Original, tcp_flags, u32::from(p.ip_len), now) {
            None | Some(CtState::Invalid) => {
                s.ct_remove(h);
                return Verdict::Drop(DropReason::ConntrackInvalid);
            }
            Some(_) => {}
        }
        self.settle_checksum(frame, &mut p, &r);
        let s = &mut *self.s;
        if xlat != orig {
            s.record(|| TraceStep::Nat {
                from: orig,
                to: xlat,
                snat,
            });
            nat::rewrite(frame, &mut p, &xlat);
        }
        let v = route::forward(t, frame, &p, r, s.next_ip_id());
        request_checksum(frame, &p, v);
        if let Verdict::Forward(port) = v {
            s.emit(|| FlowEvent {
                tuple: Some(orig),
                translated: Some(xlat),
                service: value.service,
                egress: Some(port),
                policy: Some(decision),
                ..FlowEvent::new(EventKind::NewConnection, now, ingress)
            });
        }
        v
    }

    /// An ICMP error: find the flow of the datagram it carries (that datagram went the other way,
    /// so its reversed tuple is a key of the flow), translate the embedded datagram back to what
    /// its sender saw and the outer addresses with it, then route.
    fn icmp_error(&mut self, frame: &mut Frame<'_>, p: &mut Parsed) -> Verdict {
        let Some(emb) = nat::embedded_tuple(frame, p) else {
            self.s
                .record(|| TraceStep::Conntrack(CtStep::Unrelated { quoted: None }));
            return Verdict::Drop(DropReason::BadL4Header);
        };
        let s = &mut *self.s;
        let found = s
            .ct_lookup(&emb.reversed(), self.now)
            .and_then(|(h, dir)| Some((dir, *s.ct_get(h)?)));
        let Some((dir, e)) = found else {
            s.record(|| TraceStep::Conntrack(CtStep::Unrelated { quoted: Some(emb) }));
            return Verdict::Drop(DropReason::IcmpErrorUnrelated);
        };
        s.record(|| TraceStep::Conntrack(CtStep::Related { dir, entry: e }));
        // The embedded datagram went in direction `dir.flip()`, after translation; its sender saw
        // it as that direction's key.
        let emb_to = *e.key(dir.flip());
        let peer_mac = e.value().peer_mac;
        if emb_to != emb {
            s.record(|| TraceStep::Nat {
                from: emb,
                to: emb_to,
                snat: false,
            });
            let outer_src = if p.src == emb.dst { emb_to.dst } else { p.src };
            let outer_dst = if p.dst == emb.src { emb_to.src } else { p.dst };
            nat::rewrite_icmp_error(frame, p, &emb, &emb_to, outer_src, outer_dst);
        }
        let r = route::lookup(self.t, p.dst);
        self.s.record(|| TraceStep::Route {
            dst: p.dst,
            route: r,
        });
        if let (FlowDir::Reply, Some(mac), Route::Kernel) = (dir, peer_mac, r) {
            return route::forward_external(self.t, frame, p, mac);
        }
        route::forward(self.t, frame, p, r, self.s.next_ip_id())
    }
}

/// The outer IPv4 source of a VXLAN frame (for a trace's decap step).
fn outer_source(head: &[u8]) -> [u8; 4] {
    head.get(L3_OFFSET..)
        .and_then(|l3| crate::wire::ipv4::Packet::new_checked(l3).ok())
        .map_or([0; 4], |ip| ip.src())
}

/// A frame forwarded with its checksum still partial asks the transmitter to complete it.
fn request_checksum(frame: &mut Frame<'_>, p: &Parsed, v: Verdict) {
    if p.csum_partial
        && let Verdict::Forward(_) = v
        && let (Ok(start), Some(offset)) = (
            u16::try_from(p.l4_off),
            checksum::l4_checksum_offset(p.proto),
        )
    {
        frame.set_tx_checksum(Some(TxChecksum {
            start,
            offset: offset as u16,
        }));
    }
}

/// The end event of the flow of conntrack entry `e`, with its counts both ways.
fn end_event(e: &CtEntry<FlowNat>, now: u64, ingress: PortId) -> FlowEvent {
    FlowEvent {
        tuple: Some(*e.key(FlowDir::Original)),
        translated: Some(e.key(FlowDir::Reply).reversed()),
        service: e.value().service,
        counts: FlowCounts {
            packets: [e.packets(FlowDir::Original), e.packets(FlowDir::Reply)],
            bytes: [e.bytes(FlowDir::Original), e.bytes(FlowDir::Reply)],
        },
        ..FlowEvent::new(EventKind::ConnectionEnd, now, ingress)
    }
}

#[cfg(test)]
mod tests;
