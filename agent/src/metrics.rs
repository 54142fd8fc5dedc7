//! Prometheus metrics of the agent over HTTP (`GET /metrics`, OpenMetrics text from the
//! prometheus-client crate), served on the config's `metrics_listen` address.
//!
//! The values are read from the workers' counters and the agent's state at scrape time (the data
//! path only ever does its relaxed atomic stores). Metric names:
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `sluice_agent_packets_total` | counter | `worker`, `direction` (`rx`, `tx`, `to_kernel`) | frames received, forwarded, passed to the kernel |
//! | `sluice_agent_bytes_total` | counter | `worker`, `direction` (`rx`, `tx`) | bytes of the frames received, and of those forwarded (as sent: after encap, decap, NAT) |
//! | `sluice_agent_worker_busy_seconds_total` | counter | `worker` | time the worker spent in I/O rounds that handled frames; `rate()` is its busy fraction |
//! | `sluice_agent_drops_total` | counter | `worker`, `reason` | frames dropped, by pipeline or agent drop reason |
//! | `sluice_agent_batches_total` | counter | `worker` | non-empty rx batches |
//! | `sluice_agent_handoffs_total` | counter | `worker` | frames for a port another worker owns |
//! | `sluice_agent_tx_ring_full` | gauge | `worker` | AF_XDP TX ring full events (kernel statistic) |
//! | `sluice_agent_xsk_packets_total` | counter | `worker`, `interface`, `direction` (`rx`, `tx`) | packets the worker's AF_XDP socket on the interface received, and put on its tx ring (`sluice-xdp`'s socket counters, copied every 0.5 s) |
//! | `sluice_agent_xsk_tx_queue_full_total` | counter | `worker`, `interface` | packets dropped because the socket's tx ring was full |
//! | `sluice_agent_xsk_rx_invalid_total` | counter | `worker`, `interface` | rx descriptors outside the UMEM or with a broken chain |
//! | `sluice_agent_xsk_tx_kicks_total` | counter | `worker`, `interface` | `sendto` kicks of the socket |
//! | `sluice_agent_xsk_kernel_total` | counter | `worker`, `interface`, `counter` (`rx_dropped`, `rx_ring_full`, `rx_fill_ring_empty_descs`, `rx_invalid_descs`, `tx_invalid_descs`, `tx_ring_empty_descs`) | the kernel's own counters of the socket (`XDP_STATISTICS`): frames it dropped before the worker saw them, and why |
//! | `sluice_agent_umem_frames` | gauge | `worker`, `state` (`free`, `fill`, `tx`, `held`, `lost`) | where the worker's UMEM chunks are: free, on fill rings, on tx rings (occupancy of the rings), held in batches |
//! | `sluice_agent_event_ring_occupancy` | gauge | `worker` | flow events waiting in the ring |
//! | `sluice_agent_event_ring_capacity` | gauge | `worker` | ring size |
//! | `sluice_agent_events_lost_total` | counter | `worker` | flow events lost to a full ring |
//! | `sluice_agent_events_relayed_total` | counter | | flow events handed to the control plane (`PushFlowEvents`; control-plane mode) |
//! | `sluice_agent_events_relay_dropped_total` | counter | | flow events dropped instead of relayed (control plane slow or unreachable) |
//! | `sluice_agent_table_publish_seconds` | histogram | | from a change reaching the agent (a control-plane revision, CNI ADD or DEL, a manifest reload) to the tables holding it being published |
//! | `sluice_agent_table_generation` | gauge | | generation of the published tables |
//! | `sluice_agent_pods` | gauge | | pods in the registry |
//! | `sluice_agent_worker_up` | gauge | `worker` | 1 while the worker thread runs |
//! | `sluice_agent_conntrack_entries` | gauge | `worker` | live conntrack entries (as of the worker's last busy round) |
//! | `sluice_agent_conntrack_evictions_total` | counter | `worker` | live entries evicted to make room |
//! | `sluice_agent_conntrack_expired_total` | counter | `worker` | expired entries removed |
//! | `sluice_agent_xdp_attached` | gauge | `interface`, `role` (`uplink`, `pod`) | 1 when the XDP program is loaded and the agent attached it there |
//! | `sluice_agent_xdp_classifier_total` | counter | `counter` | the XDP classifier's own counters |

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::Agent;
use super::counters::WorkerCountersView;

type Labels = Vec<(&'static str, String)>;

/// The agent's table publish latency histogram: 50 µs to about 1.6 s, doubling.
pub fn publish_latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(50e-6, 2.0, 16))
}

fn counter_family(r: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let f = Family::<Labels, Counter>::default();
    r.register(name, help, f.clone());
    f
}

fn gauge_family(r: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let f = Family::<Labels, Gauge>::default();
    r.register(name, help, f.clone());
    f
}

fn gauge(r: &mut Registry, name: &str, help: &str) -> Gauge {
    let g = Gauge::<i64>::default();
    r.register(name, help, g.clone());
    g
}

fn counter(r: &mut Registry, name: &str, help: &str) -> Counter {
    let c = Counter::<u64>::default();
    r.register(name, help, c.clone());
    c
}

fn i(v: impl TryInto<i64>) -> i64 {
    v.try_into().unwrap_or(i64::MAX)
}

/// The agent's metrics: the registry and its families are built once; a scrape clears the
/// families and fills them with the values read then (so labels of gone workers, pods or
/// interfaces disappear), and encodes.
pub struct AgentMetrics {
    registry: Registry,
    packets: Family<Labels, Counter>,
    drops: Family<Labels, Counter>,
    bytes: Family<Labels, Counter>,
    busy: Family<Labels, Counter<f64>>,
    batches: Family<Labels, Counter>,
    handoffs: Family<Labels, Counter>,
    ring_full: Family<Labels, Gauge>,
    occupancy: Family<Labels, Gauge>,
    capacity: Family<Labels, Gauge>,
    lost: Family<Labels, Counter>,
    ct_entries: Family<Labels, Gauge>,
    ct_evictions: Family<Labels, Counter>,
    ct_expired: Family<Labels, Counter>,
    up: Family<Labels, Gauge>,
    xsk_packets: Family<Labels, Counter>,
    xsk_full: Family<Labels, Counter>,
    xsk_invalid: Family<Labels, Counter>,
    xsk_kicks: Family<Labels, Counter>,
    xsk_kernel: Family<Labels, Counter>,
    umem: Family<Labels, Gauge>,
    generation: Gauge,
    pods: Gauge,
    attached: Family<Labels, Gauge>,
    xdp: Family<Labels, Counter>,
    relayed: Counter,
    relay_dropped: Counter,
}

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentMetrics").finish_non_exhaustive()
    }
}

impl AgentMetrics {
    /// Register every metric once; `publish_latency` is the agent's histogram (observed as tables
    /// are published, not at scrape).
    pub fn new(publish_latency: Histogram) -> Self {
        let mut r = Registry::default();
        let r = &mut r;
        let packets = counter_family(
            r,
            "sluice_agent_packets",
            "Frames by worker and direction (rx received, tx forwarded, to_kernel passed to the kernel)",
        );
        let drops = counter_family(r, "sluice_agent_drops", "Frames dropped, by reason");
        let bytes = counter_family(
            r,
            "sluice_agent_bytes",
            "Bytes by worker and direction (rx received, tx forwarded as sent)",
        );
        let busy = Family::<Labels, Counter<f64>>::default();
        r.register(
            "sluice_agent_worker_busy_seconds",
            "Time the worker spent in I/O rounds that handled frames (rate: busy fraction)",
            busy.clone(),
        );
        let m = Self {
            packets,
            drops,
            bytes,
            busy,
            batches: counter_family(r, "sluice_agent_batches", "Non-empty rx batches"),
            handoffs: counter_family(
                r,
                "sluice_agent_handoffs",
                "Frames handed to the worker that owns their connection or egress port",
            ),
            ring_full: gauge_family(
                r,
                "sluice_agent_tx_ring_full",
                "AF_XDP TX ring full events (kernel statistic)",
            ),
            occupancy: gauge_family(
                r,
                "sluice_agent_event_ring_occupancy",
                "Flow events waiting in the worker's ring",
            ),
            capacity: gauge_family(
                r,
                "sluice_agent_event_ring_capacity",
                "Size of the worker's flow event ring",
            ),
            lost: counter_family(
                r,
                "sluice_agent_events_lost",
                "Flow events lost because the ring was full",
            ),
            ct_entries: gauge_family(
                r,
                "sluice_agent_conntrack_entries",
                "Live conntrack entries of the worker",
            ),
            ct_evictions: counter_family(
                r,
                "sluice_agent_conntrack_evictions",
                "Live conntrack entries evicted to make room",
            ),
            ct_expired: counter_family(
                r,
                "sluice_agent_conntrack_expired",
                "Expired conntrack entries removed",
            ),
            up: gauge_family(
                r,
                "sluice_agent_worker_up",
                "1 while the worker thread runs",
            ),
            xsk_packets: counter_family(
                r,
                "sluice_agent_xsk_packets",
                "Packets of the worker's AF_XDP socket on the interface (rx received, tx put on its ring)",
            ),
            xsk_full: counter_family(
                r,
                "sluice_agent_xsk_tx_queue_full",
                "Packets dropped because the socket's tx ring was full",
            ),
            xsk_invalid: counter_family(
                r,
                "sluice_agent_xsk_rx_invalid",
                "Rx descriptors outside the UMEM or with a broken chain",
            ),
            xsk_kicks: counter_family(
                r,
                "sluice_agent_xsk_tx_kicks",
                "Transmit kicks (sendto) of the socket",
            ),
            xsk_kernel: counter_family(
                r,
                "sluice_agent_xsk_kernel",
                "The kernel's counters of the worker's AF_XDP socket on the interface (XDP_STATISTICS)",
            ),
            umem: gauge_family(
                r,
                "sluice_agent_umem_frames",
                "Where the worker's UMEM chunks are (free, fill and tx rings, held)",
            ),
            generation: gauge(
                r,
                "sluice_agent_table_generation",
                "Generation of the published tables",
            ),
            pods: gauge(r, "sluice_agent_pods", "Pods in the registry"),
            attached: gauge_family(
                r,
                "sluice_agent_xdp_attached",
                "1 when the XDP program is loaded and attached to the interface",
            ),
            xdp: counter_family(
                r,
                "sluice_agent_xdp_classifier",
                "The XDP classifier's counters",
            ),
            relayed: counter(
                r,
                "sluice_agent_events_relayed",
                "Flow events handed to the control plane",
            ),
            relay_dropped: counter(
                r,
                "sluice_agent_events_relay_dropped",
                "Flow events dropped instead of relayed to the control plane",
            ),
            registry: Registry::default(),
        };
        r.register(
            "sluice_agent_table_publish_seconds",
            "From a change reaching the agent to the tables holding it being published",
            publish_latency,
        );
        Self {
            registry: std::mem::take(r),
            ..m
        }
    }

    fn clear(&self) {
        for f in [
            &self.packets,
            &self.drops,
            &self.bytes,
            &self.batches,
            &self.handoffs,
            &self.lost,
            &self.ct_evictions,
            &self.ct_expired,
            &self.xsk_packets,
            &self.xsk_full,
            &self.xsk_invalid,
            &self.xsk_kicks,
            &self.xsk_kernel,
            &self.xdp,
        ] {
            f.clear();
        }
        for f in [
            &self.ring_full,
            &self.occupancy,
            &self.capacity,
            &self.ct_entries,
            &self.up,
            &self.umem,
            &self.attached,
        ] {
            f.clear();
        }
        self.busy.clear();
    }

    /// The current metrics as OpenMetrics text.
    pub async fn render(&self, agent: &Agent) -> String {
        let snap = agent.counters().await;
        self.clear();
        let mut ifnames: std::collections::HashMap<u32, String> = agent
            .registry
            .lock()
            .await
            .pods()
            .map(|p| (p.host_ifindex, p.host_ifname.clone()))
            .collect();
        ifnames.insert(
            agent.uplink_ifindex,
            agent.config.underlay.interface.clone(),
        );
        if let Some(p) = agent.punt {
            ifnames.insert(p.port.0, super::punt::PUNT_IFNAME.to_owned());
        }
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        for (w, view) in agent.workers.iter().zip(&snap.workers) {
            let WorkerCountersView {
                rx,
                tx,
                to_kernel,
                batches: b,
                handoffs: h,
                ring_full: rf,
                drops: d,
                rx_bytes,
                tx_bytes,
                busy_ns,
                ..
            } = view;
            let worker = w.id.to_string();
            for (dir, n) in [("rx", rx), ("tx", tx), ("to_kernel", to_kernel)] {
                self.packets
                    .get_or_create(&vec![("worker", worker.clone()), ("direction", dir.into())])
                    .inc_by(*n);
            }
            for (dir, n) in [("rx", rx_bytes), ("tx", tx_bytes)] {
                self.bytes
                    .get_or_create(&vec![("worker", worker.clone()), ("direction", dir.into())])
                    .inc_by(*n);
            }
            self.busy
                .get_or_create(&vec![("worker", worker.clone())])
                .inc_by(*busy_ns as f64 / 1e9);
            for (reason, n) in d {
                self.drops
                    .get_or_create(&vec![
                        ("worker", worker.clone()),
                        ("reason", reason.clone()),
                    ])
                    .inc_by(*n);
            }
            let wl = vec![("worker", worker.clone())];
            self.batches.get_or_create(&wl).inc_by(*b);
            self.handoffs.get_or_create(&wl).inc_by(*h);
            self.ring_full.get_or_create(&wl).set(i(*rf));
            if let Ok(x) = w.counters.xdp.lock() {
                for (port, st, kernel) in &x.sockets {
                    let name = ifnames
                        .get(&port.0)
                        .cloned()
                        .unwrap_or_else(|| port.0.to_string());
                    let l = vec![("worker", worker.clone()), ("interface", name)];
                    for (dir, n) in [("rx", st.rx_packets), ("tx", st.tx_packets)] {
                        let mut l = l.clone();
                        l.push(("direction", dir.into()));
                        self.xsk_packets.get_or_create(&l).inc_by(n);
                    }
                    self.xsk_full.get_or_create(&l).inc_by(st.tx_queue_full);
                    self.xsk_invalid.get_or_create(&l).inc_by(st.rx_invalid);
                    self.xsk_kicks.get_or_create(&l).inc_by(st.tx_kicks);
                    for (name, n) in kernel.fields() {
                        let mut l = l.clone();
                        l.push(("counter", name.into()));
                        self.xsk_kernel.get_or_create(&l).inc_by(n);
                    }
                }
                let u = &x.umem;
                for (state, n) in [
                    ("free", u.free),
                    ("fill", u.fill),
                    ("tx", u.tx),
                    ("held", u.held),
                    ("lost", u.lost),
                ] {
                    self.umem
                        .get_or_create(&vec![("worker", worker.clone()), ("state", state.into())])
                        .set(i(n));
                }
            }
            let (occ, cap, l) = w.counters.events.stats();
            self.occupancy.get_or_create(&wl).set(i(occ));
            self.capacity.get_or_create(&wl).set(i(cap));
            self.lost.get_or_create(&wl).inc_by(l);
            self.up.get_or_create(&wl).set(i64::from(w.is_running()));
            self.ct_entries
                .get_or_create(&wl)
                .set(i(load(&w.counters.ct_entries)));
            self.ct_evictions
                .get_or_create(&wl)
                .inc_by(load(&w.counters.ct_evictions));
            self.ct_expired
                .get_or_create(&wl)
                .inc_by(load(&w.counters.ct_expired));
        }
        self.generation.set(i(snap.generation));
        self.pods.set(i(snap.pods));
        let ready = i64::from(snap.datapath);
        self.attached
            .get_or_create(&vec![
                ("interface", agent.config.underlay.interface.clone()),
                ("role", "uplink".into()),
            ])
            .set(ready);
        for p in agent.registry.lock().await.pods() {
            self.attached
                .get_or_create(&vec![
                    ("interface", p.host_ifname.clone()),
                    ("role", "pod".into()),
                ])
                .set(ready);
        }
        for (name, n) in &snap.xdp {
            self.xdp
                .get_or_create(&vec![("counter", name.clone())])
                .inc_by(*n);
        }
        // Counters only go up: raise them to the agent's totals.
        let raise = |c: &Counter, total: u64| {
            c.inc_by(total.saturating_sub(c.get()));
        };
        raise(&self.relayed, load(&agent.events.relayed));
        raise(&self.relay_dropped, load(&agent.events.relay_dropped));
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
            let _ = writeln!(out, "# EOF");
        }
        out
    }
}

/// The Prometheus text form of the OpenMetrics text (`promtool check metrics` reads only that); the
/// control plane's metrics endpoint uses the same conversion.
pub use sluice_control::metrics::to_prometheus_text;

/// Serve `GET /metrics` on `addr` until the task is dropped: OpenMetrics when the scraper accepts
/// it (Prometheus does), else the Prometheus text format. The HTTP side is the control plane's.
pub async fn serve(agent: Arc<Agent>, addr: SocketAddr) -> std::io::Result<()> {
    tracing::info!(%addr, "metrics");
    // One scrape at a time fills the families.
    let metrics = Arc::new(tokio::sync::Mutex::new(AgentMetrics::new(
        agent.publish_latency.clone(),
    )));
    sluice_control::metrics::serve_http(addr, move || {
        let (agent, metrics) = (agent.clone(), metrics.clone());
        async move { metrics.lock().await.render(&agent).await }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_names_counter_families_with_total() {
        let mut r = Registry::default();
        let c = counter_family(&mut r, "sluice_agent_drops", "Frames dropped");
        c.get_or_create(&vec![("reason", "no_route".into())])
            .inc_by(5);
        gauge(&mut r, "sluice_agent_pods", "Pods").set(2);
        let mut om = String::new();
        encode(&mut om, &r).unwrap();
        let text = to_prometheus_text(&om);
        assert!(
            text.contains("# HELP sluice_agent_drops_total Frames dropped.\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE sluice_agent_drops_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("sluice_agent_drops_total{reason=\"no_route\"} 5\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE sluice_agent_pods gauge\nsluice_agent_pods 2\n"),
            "{text}"
        );
        assert!(!text.contains("# EOF"));
    }
}
