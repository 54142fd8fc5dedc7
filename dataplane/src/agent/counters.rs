//! Per-worker counters: written by one worker with relaxed atomic adds, read by the agent thread
//! for export (`<state>/counters.json`, rewritten about once a second and on shutdown).
//!
//! Drop counters are indexed by the pipeline's `DropReason as u8`; [`MAX_DROP_REASONS`] bounds that
//! index and an out-of-range reason is counted in the last slot rather than panicking.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

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
}
