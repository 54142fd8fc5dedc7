//! Per-worker counters: written by one worker with relaxed atomic adds, read by the agent thread
//! for export (`<state>/counters.json`, rewritten about once a second and on shutdown).
//!
//! Drop counters are indexed by the pipeline's `DropReason as u8`; [`MAX_DROP_REASONS`] bounds that
//! index and an out-of-range reason is counted in the last slot rather than panicking.

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use sluice_xdp::{FrameAccounting, KernelStats, SocketId, SocketStats, Xsk};

use serde::Serialize;

use super::tables::PortId;
use sluice_dataplane::pipeline::WorkerState;

/// How often a worker copies its AF_XDP socket statistics and UMEM accounting for the metrics.
pub const XDP_STATS_INTERVAL_NS: u64 = 500_000_000;

/// A worker's AF_XDP view, as of its last copy (every [`XDP_STATS_INTERVAL_NS`]).
#[derive(Debug, Default, Clone)]
pub struct XdpStats {
    /// Per socket: the port (interface index), `sluice-xdp`'s counters of it and the kernel's
    /// (`XDP_STATISTICS`; zero if it could not be read).
    pub sockets: Vec<(PortId, SocketStats, KernelStats)>,
    /// Where the UMEM's chunks are (free, on fill rings, on tx rings, held).
    pub umem: FrameAccounting,
}

impl XdpStats {
    /// Copy the statistics of `sockets` of `xsk` (one `getsockopt` per socket for the kernel's
    /// counters, every [`XDP_STATS_INTERVAL_NS`], never per packet).
    pub fn read(&mut self, xsk: &Xsk, sockets: impl Iterator<Item = (PortId, SocketId)>) {
        self.sockets.clear();
        self.sockets.extend(sockets.filter_map(|(p, id)| {
            let kernel = xsk.kernel_stats(id).unwrap_or_default();
            Some((p, xsk.stats(id).ok()?, kernel))
        }));
        self.umem = xsk.accounting();
    }
}

/// Slots for drop reasons (the pipeline's `DropReason` is a `#[repr(u8)]` enum below this).
pub const MAX_DROP_REASONS: usize = 32;

/// Counters of one worker.
#[derive(Debug)]
pub struct WorkerCounters {
    pub rx: AtomicU64,
    pub tx: AtomicU64,
    pub batches: AtomicU64,
    /// A TX or fill ring had no room for a whole batch.
    pub ring_full: AtomicU64,
    /// Frames handed to another worker (copied into its UMEM).
    pub handoffs: AtomicU64,
    /// Frames passed to the kernel (the pipeline said so).
    pub to_kernel: AtomicU64,
    pub drops: [AtomicU64; MAX_DROP_REASONS],
    /// The worker's flow event ring.
    pub events: super::events::WorkerRing,
    /// The worker's conntrack: live entries, evictions, expired removals (stored after busy rounds).
    pub ct_entries: AtomicU64,
    pub ct_evictions: AtomicU64,
    pub ct_expired: AtomicU64,
    /// Bytes of the frames received and forwarded (the pipeline's, stored after busy rounds).
    pub rx_bytes: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Nanoseconds spent in I/O rounds that handled frames (its rate is the busy fraction).
    pub busy_ns: AtomicU64,
    /// AF_XDP sockets and UMEM (the worker only `try_lock`s it, every [`XDP_STATS_INTERVAL_NS`]).
    pub xdp: Mutex<XdpStats>,
    /// Worker-side: when to copy [`WorkerCounters::xdp`] next.
    next_xdp_ns: AtomicU64,
}

impl Default for WorkerCounters {
    fn default() -> Self {
        Self {
            rx: AtomicU64::new(0),
            tx: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            ring_full: AtomicU64::new(0),
            handoffs: AtomicU64::new(0),
            to_kernel: AtomicU64::new(0),
            drops: std::array::from_fn(|_| AtomicU64::new(0)),
            events: Default::default(),
            ct_entries: AtomicU64::new(0),
            ct_evictions: AtomicU64::new(0),
            ct_expired: AtomicU64::new(0),
            rx_bytes: AtomicU64::new(0),
            tx_bytes: AtomicU64::new(0),
            busy_ns: AtomicU64::new(0),
            xdp: Mutex::default(),
            next_xdp_ns: AtomicU64::new(0),
        }
    }
}

impl WorkerCounters {
    /// Count one drop of reason index `reason`.
    pub fn drop(&self, reason: u8, n: u64) {
        let i = usize::from(reason).min(MAX_DROP_REASONS - 1);
        self.drops[i].fetch_add(n, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The end of one I/O round of the worker (`WorkerIo::poll_once`), which began at
    /// `round_start_ns` on the worker's clock `start` and handled `handled` frames: runs conntrack
    /// expiry when due ([`WorkerState::expire_due`], emitting connection ends), then stores what
    /// the metrics read: the busy time and bytes of a round that handled frames, the conntrack
    /// stats when anything changed them, and every [`XDP_STATS_INTERVAL_NS`] the AF_XDP view that
    /// `xdp` fills in (skipped if a scrape holds it). One clock read per busy round, nothing per
    /// frame.
    pub fn end_round(
        &self,
        state: &mut WorkerState,
        start: Instant,
        round_start_ns: u64,
        handled: usize,
        xdp: impl FnOnce(&mut XdpStats),
    ) {
        if round_start_ns >= self.next_xdp_ns.load(Ordering::Relaxed)
            && let Ok(mut x) = self.xdp.try_lock()
        {
            xdp(&mut x);
            self.next_xdp_ns.store(
                round_start_ns.saturating_add(XDP_STATS_INTERVAL_NS),
                Ordering::Relaxed,
            );
        }
        let expired = state.expire_due(round_start_ns);
        let set = |c: &AtomicU64, v: u64| c.store(v, Ordering::Relaxed);
        if handled > 0 {
            let now = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
            Self::add(&self.busy_ns, now.saturating_sub(round_start_ns));
            set(&self.rx_bytes, state.counters.rx_bytes);
            set(&self.tx_bytes, state.counters.tx_bytes);
        }
        if handled > 0 || expired > 0 {
            let ct = state.conntrack.stats();
            set(&self.ct_entries, ct.entries);
            set(&self.ct_evictions, ct.evictions);
            set(&self.ct_expired, ct.expired);
        }
    }

    /// A consistent-enough copy for export (each field read once).
    pub fn snapshot(
        &self,
        id: usize,
        core: Option<usize>,
        drop_name: fn(u8) -> String,
    ) -> WorkerCountersView {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        WorkerCountersView {
            id,
            core,
            rx: get(&self.rx),
            tx: get(&self.tx),
            batches: get(&self.batches),
            ring_full: get(&self.ring_full),
            handoffs: get(&self.handoffs),
            to_kernel: get(&self.to_kernel),
            rx_bytes: get(&self.rx_bytes),
            tx_bytes: get(&self.tx_bytes),
            busy_ns: get(&self.busy_ns),
            drops: self
                .drops
                .iter()
                .enumerate()
                .filter_map(|(i, c)| {
                    let n = get(c);
                    let i = u8::try_from(i).ok()?;
                    (n > 0).then(|| (drop_name(i), n))
                })
                .collect(),
        }
    }
}

/// The exported form of one worker's counters.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct WorkerCountersView {
    pub id: usize,
    pub core: Option<usize>,
    pub rx: u64,
    pub tx: u64,
    pub batches: u64,
    pub ring_full: u64,
    pub handoffs: u64,
    pub to_kernel: u64,
    #[serde(default)]
    pub rx_bytes: u64,
    #[serde(default)]
    pub tx_bytes: u64,
    /// Nanoseconds of rounds that handled frames.
    #[serde(default)]
    pub busy_ns: u64,
    /// Drops by reason name (only reasons seen).
    pub drops: std::collections::BTreeMap<String, u64>,
}

/// The whole counters file.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct CountersFile {
    pub node: String,
    pub generation: u64,
    pub pods: usize,
    pub datapath: bool,
    pub workers: Vec<WorkerCountersView>,
    /// The XDP classifier's counters (frames redirected to the workers, passed to the kernel).
    #[serde(default)]
    pub xdp: std::collections::BTreeMap<String, u64>,
}

impl CountersFile {
    /// Sum of drops of `reason` over all workers.
    pub fn drops(&self, reason: &str) -> u64 {
        self.workers
            .iter()
            .filter_map(|w| w.drops.get(reason))
            .sum()
    }

    /// Write atomically (temporary file, then rename).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_are_bounded_and_named() {
        let c = WorkerCounters::default();
        c.drop(2, 3);
        c.drop(250, 1);
        WorkerCounters::add(&c.rx, 5);
        let v = c.snapshot(0, Some(1), |i| format!("r{i}"));
        assert_eq!(v.rx, 5);
        assert_eq!(v.drops.get("r2"), Some(&3));
        assert_eq!(v.drops.get(&format!("r{}", MAX_DROP_REASONS - 1)), Some(&1));
        let f = CountersFile {
            node: "n".into(),
            generation: 1,
            pods: 0,
            datapath: false,
            workers: vec![v.clone(), v],
            xdp: Default::default(),
        };
        assert_eq!(f.drops("r2"), 6);
    }

    #[test]
    fn end_round_stores_bytes_busy_time_and_expires() {
        use sluice_dataplane::demo::{self, FrameSpec};
        use sluice_dataplane::frame::Frame;
        let t = demo::demo_tables();
        let mut s = WorkerState::new(sluice_dataplane::pipeline::WorkerConfig::default());
        let udp = demo::udp_frame(&FrameSpec::from_pod(2, [10, 244, 1, 3], 5000, 6000), b"x");
        let mut buf = udp.clone();
        let len = buf.len();
        let v = sluice_dataplane::pipeline::process(
            &t,
            &mut s,
            0,
            sluice_dataplane::verdict::PortId(1),
            &mut Frame::new(&mut buf, 0, len),
        );
        assert!(
            matches!(v, sluice_dataplane::verdict::Verdict::Forward(_)),
            "{v:?}"
        );
        let c = WorkerCounters::default();
        let start = Instant::now();
        c.end_round(&mut s, start, 0, 1, |x| x.umem.total = 7);
        let v = c.snapshot(0, None, |i| i.to_string());
        assert_eq!((v.rx_bytes, v.tx_bytes), (len as u64, len as u64));
        assert_eq!(c.ct_entries.load(Ordering::Relaxed), 1);
        let busy = v.busy_ns;
        // Idle rounds long after: within one pass of the sweep hand over the table, the flow
        // expires; the busy time stays.
        let pass = (s.conntrack.capacity() / sluice_dataplane::pipeline::EXPIRE_BUDGET) as u64;
        for k in 0..pass {
            let now = 1_000_000_000_000 + k * sluice_dataplane::pipeline::EXPIRE_INTERVAL_NS;
            c.end_round(&mut s, start, now, 0, |x| x.umem.total += 1);
        }
        assert_eq!(c.ct_entries.load(Ordering::Relaxed), 0);
        assert_eq!(c.ct_expired.load(Ordering::Relaxed), 1);
        assert_eq!(c.busy_ns.load(Ordering::Relaxed), busy);
        // The AF_XDP view is copied at most every XDP_STATS_INTERVAL_NS (the idle rounds above
        // were 100 ms apart).
        let every = XDP_STATS_INTERVAL_NS / sluice_dataplane::pipeline::EXPIRE_INTERVAL_NS;
        assert_eq!(c.xdp.lock().unwrap().umem.total, 7 + pass.div_ceil(every));
    }
}
