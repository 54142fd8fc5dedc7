//! The control plane's own Prometheus metrics (`sluice-control --metrics-listen ADDR`, `GET /metrics`,
//! served by [`super::serve_http`]).
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `sluice_control_revision` | gauge | | the store's current revision |
//! | `sluice_control_objects` | gauge | | objects stored |
//! | `sluice_control_watchers` | gauge | `node` | open watches of the node's agent |
//! | `sluice_control_watch_lag_revisions` | gauge | `node` | current revision minus the revision the agent last reported synced |
//! | `sluice_control_flow_events_received_total` | counter | `node` | flow events the node's agent pushed (`PushFlowEvents`) |
//! | `sluice_control_flow_events_agent_dropped_total` | counter | `node` | flow events the node's agent dropped instead of pushing (control plane slow or away), as it last reported |
//! | `sluice_control_flow_events_held` | gauge | `node` | flow events of the node held for `Observe` |
//! | `sluice_control_flow_event_streams` | gauge | `node` | open `PushFlowEvents` streams of the node |
//! | `sluice_control_requests_total` | counter | `method`, `code` | gRPC requests by full method path and gRPC status code (`0` OK; for streams the code of the response head) |
//!
//! Scrapers that accept OpenMetrics get it; others get the Prometheus text format.
//!
//! [`ControlRegistry`] is built once; each scrape reads a [`ControlMetrics`] (store revision and
//! object count, agents' watch state, flow relay statistics) and encodes it with the request counts
//! [`CountLayer`] keeps.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tonic::codegen::http;

use crate::server::ControlMetrics;

/// Requests by (method path, gRPC code).
#[derive(Debug, Default)]
pub struct RequestCounts(Mutex<BTreeMap<(String, String), u64>>);

impl RequestCounts {
    pub fn inc(&self, method: String, code: String) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry((method, code)).or_default() += 1;
    }
    pub fn snapshot(&self) -> BTreeMap<(String, String), u64> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A tower layer counting requests into [`RequestCounts`].
#[derive(Debug, Clone)]
pub struct CountLayer(pub Arc<RequestCounts>);

impl<S> tower::Layer<S> for CountLayer {
    type Service = Count<S>;
    fn layer(&self, inner: S) -> Count<S> {
        Count {
            inner,
            counts: self.0.clone(),
        }
    }
}

/// The service [`CountLayer`] wraps around the API.
#[derive(Debug, Clone)]
pub struct Count<S> {
    inner: S,
    counts: Arc<RequestCounts>,
}

impl<S, B, RB> tower::Service<http::Request<B>> for Count<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().to_owned();
        let counts = self.counts.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let r = fut.await;
            let code = match &r {
                // Errors are "trailers-only" responses: the status is in the head. A head
                // without it is a response that started OK.
                Ok(resp) => resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("0")
                    .to_owned(),
                Err(_) => "transport_error".to_owned(),
            };
            counts.inc(method, code);
            r
        })
    }
}

/// The control plane's metrics registry, built once at startup: one collector that encodes, at
/// each scrape, the [`ControlMetrics`] the scrape just read and the request counts. Nodes that
/// are gone disappear from the next scrape; counters are the sources' totals, never re-added.
#[derive(Debug)]
pub struct ControlRegistry {
    registry: Registry,
    scrape: Arc<Scrape>,
}

/// What the collector encodes.
#[derive(Debug)]
struct Scrape {
    latest: Mutex<ControlMetrics>,
    requests: Arc<RequestCounts>,
}

impl ControlRegistry {
    /// The registry, reporting `requests` (what [`CountLayer`] counts) along with each scrape's
    /// [`ControlMetrics`].
    pub fn new(requests: Arc<RequestCounts>) -> Self {
        let scrape = Arc::new(Scrape {
            latest: Mutex::default(),
            requests,
        });
        let mut registry = Registry::default();
        registry.register_collector(Box::new(scrape.clone()));
        Self { registry, scrape }
    }

    /// The metrics as OpenMetrics text, with `m` (read for this scrape) as the current values.
    pub fn render(&self, m: ControlMetrics) -> String {
        *self.scrape.latest.lock().unwrap_or_else(|p| p.into_inner()) = m;
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out = "# EOF\n".into();
        }
        out
    }
}

fn saturating_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Encode one metric family: its descriptor, then each labelled sample. Help texts end with a
/// period, as `Registry::register` would add.
fn family<L: EncodeLabelSet, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric_type: MetricType,
    samples: impl IntoIterator<Item = (L, M)>,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, metric) in samples {
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A gauge without labels.
fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let g = ConstGauge::new(saturating_i64(v));
    g.encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let m = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        let e = &mut encoder;
        let node = |n: &str| [("node", n.to_owned())];
        gauge(
            e,
            "sluice_control_revision",
            "The store's current revision.",
            m.revision,
        )?;
        gauge(
            e,
            "sluice_control_objects",
            "Objects stored.",
            m.objects as u64,
        )?;
        family(
            e,
            "sluice_control_watchers",
            "Open watches of each node's agent.",
            MetricType::Gauge,
            m.agents
                .iter()
                .map(|(n, watches, _)| (node(n), ConstGauge::new(i64::from(*watches)))),
        )?;
        family(
            e,
            "sluice_control_watch_lag_revisions",
            "Current revision minus the revision the node's agent last reported synced.",
            MetricType::Gauge,
            m.agents.iter().map(|(n, _, synced)| {
                let lag = m.revision.saturating_sub(*synced);
                (node(n), ConstGauge::new(saturating_i64(lag)))
            }),
        )?;
        family(
            e,
            "sluice_control_flow_events_received",
            "Flow events the node's agent pushed.",
            MetricType::Counter,
            m.flows
                .iter()
                .map(|(n, f)| (node(n), ConstCounter::new(f.received))),
        )?;
        family(
            e,
            "sluice_control_flow_events_agent_dropped",
            "Flow events the node's agent dropped instead of pushing, as it last reported.",
            MetricType::Counter,
            m.flows
                .iter()
                .map(|(n, f)| (node(n), ConstCounter::new(f.agent_dropped))),
        )?;
        family(
            e,
            "sluice_control_flow_events_held",
            "Flow events of the node held for Observe.",
            MetricType::Gauge,
            m.flows
                .iter()
                .map(|(n, f)| (node(n), ConstGauge::new(saturating_i64(f.held as u64)))),
        )?;
        family(
            e,
            "sluice_control_flow_event_streams",
            "Open PushFlowEvents streams of the node.",
            MetricType::Gauge,
            m.flows
                .iter()
                .map(|(n, f)| (node(n), ConstGauge::new(i64::from(f.streams)))),
        )?;
        family(
            e,
            "sluice_control_requests",
            "gRPC requests by method and status code.",
            MetricType::Counter,
            self.requests
                .snapshot()
                .into_iter()
                .map(|((method, code), n)| {
                    ([("method", method), ("code", code)], ConstCounter::new(n))
                }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::to_prometheus_text;

    #[test]
    fn renders_revision_lag_and_requests() {
        let m = ControlMetrics {
            revision: 10,
            objects: 3,
            agents: vec![("n0".into(), 1, 7)],
            flows: vec![(
                "n0".into(),
                crate::flows::NodeFlowStats {
                    received: 5,
                    agent_dropped: 2,
                    held: 5,
                    streams: 1,
                },
            )],
        };
        let c = Arc::new(RequestCounts::default());
        c.inc("/sluice.control.v1.Control/Apply".into(), "0".into());
        c.inc("/sluice.control.v1.Control/Apply".into(), "0".into());
        let text = to_prometheus_text(&ControlRegistry::new(c).render(m));
        assert!(text.contains("sluice_control_revision 10\n"), "{text}");
        assert!(
            text.contains("sluice_control_watch_lag_revisions{node=\"n0\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE sluice_control_requests_total counter\n"));
        assert!(
            text.contains("sluice_control_flow_events_received_total{node=\"n0\"} 5\n"),
            "{text}"
        );
        // Valid exposition text (promtool comes with Debian's prometheus package, scripts/setup.sh).
        use std::io::Write;
        let mut promtool = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("promtool (Debian package prometheus) is needed by this test");
        promtool
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = promtool.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains(
            "sluice_control_requests_total{method=\"/sluice.control.v1.Control/Apply\",code=\"0\"} 2\n"
        ));
    }

    fn metrics(nodes: &[(&str, u64)]) -> ControlMetrics {
        ControlMetrics {
            revision: 10,
            objects: 3,
            agents: nodes.iter().map(|(n, s)| (n.to_string(), 1, *s)).collect(),
            flows: nodes
                .iter()
                .map(|(n, _)| {
                    let stats = crate::flows::NodeFlowStats {
                        received: 5,
                        agent_dropped: 2,
                        held: 5,
                        streams: 1,
                    };
                    (n.to_string(), stats)
                })
                .collect(),
        }
    }

    #[test]
    fn one_registry_renders_each_scrape_as_it_is() {
        let counts = Arc::new(RequestCounts::default());
        let registry = ControlRegistry::new(counts.clone());
        counts.inc("/sluice.control.v1.Control/Watch".into(), "0".into());
        let first = registry.render(metrics(&[("n0", 7), ("n1", 10)]));
        counts.inc("/sluice.control.v1.Control/Watch".into(), "0".into());
        let second = registry.render(metrics(&[("n1", 9)]));
        for (text, watches) in [(&first, 1), (&second, 2)] {
            assert!(
                text.contains(&format!(
                    "sluice_control_requests_total{{method=\"/sluice.control.v1.Control/Watch\",code=\"0\"}} {watches}\n"
                )),
                "{text}"
            );
        }
        assert!(first.contains("sluice_control_watchers{node=\"n0\"} 1\n"));
        assert!(
            !second.contains("node=\"n0\""),
            "a node gone since the last scrape is not reported: {second}"
        );
        assert!(
            second.contains("sluice_control_flow_events_received_total{node=\"n1\"} 5\n"),
            "counters are the source's totals, not added up over scrapes: {second}"
        );
        assert!(second.contains("sluice_control_watch_lag_revisions{node=\"n1\"} 1\n"));
    }

    #[test]
    fn the_text_is_what_a_registry_per_scrape_gave() {
        // What the registry-per-scrape rendering this replaced gave for the same input.
        const BEFORE: &str = "\
# HELP sluice_control_revision The store's current revision.
# TYPE sluice_control_revision gauge
sluice_control_revision 10
# HELP sluice_control_objects Objects stored.
# TYPE sluice_control_objects gauge
sluice_control_objects 3
# HELP sluice_control_watchers Open watches of each node's agent.
# TYPE sluice_control_watchers gauge
sluice_control_watchers{node=\"n1\"} 0
sluice_control_watchers{node=\"n0\"} 1
# HELP sluice_control_watch_lag_revisions Current revision minus the revision the node's agent last reported synced.
# TYPE sluice_control_watch_lag_revisions gauge
sluice_control_watch_lag_revisions{node=\"n1\"} 0
sluice_control_watch_lag_revisions{node=\"n0\"} 3
# HELP sluice_control_flow_events_received Flow events the node's agent pushed.
# TYPE sluice_control_flow_events_received counter
sluice_control_flow_events_received_total{node=\"n0\"} 5
# HELP sluice_control_flow_events_agent_dropped Flow events the node's agent dropped instead of pushing, as it last reported.
# TYPE sluice_control_flow_events_agent_dropped counter
sluice_control_flow_events_agent_dropped_total{node=\"n0\"} 2
# HELP sluice_control_flow_events_held Flow events of the node held for Observe.
# TYPE sluice_control_flow_events_held gauge
sluice_control_flow_events_held{node=\"n0\"} 5
# HELP sluice_control_flow_event_streams Open PushFlowEvents streams of the node.
# TYPE sluice_control_flow_event_streams gauge
sluice_control_flow_event_streams{node=\"n0\"} 1
# HELP sluice_control_requests gRPC requests by method and status code.
# TYPE sluice_control_requests counter
sluice_control_requests_total{method=\"/sluice.control.v1.Control/Watch\",code=\"14\"} 1
sluice_control_requests_total{method=\"/sluice.control.v1.Control/Apply\",code=\"0\"} 2
# EOF
";
        let mut m = metrics(&[("n0", 7)]);
        m.agents.push(("n1".into(), 0, 10));
        let counts = Arc::new(RequestCounts::default());
        counts.inc("/sluice.control.v1.Control/Apply".into(), "0".into());
        counts.inc("/sluice.control.v1.Control/Apply".into(), "0".into());
        counts.inc("/sluice.control.v1.Control/Watch".into(), "14".into());
        let text = ControlRegistry::new(counts).render(m);
        // Samples within a family may come in another order (the old one followed a hash map).
        let sorted = |t: &str| {
            let mut v: Vec<String> = t.lines().map(str::to_owned).collect();
            v.sort_unstable();
            v
        };
        assert_eq!(sorted(&text), sorted(BEFORE), "{text}");
        let families = |t: &str| {
            t.lines()
                .filter(|l| l.starts_with("# TYPE"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            families(&text),
            families(BEFORE),
            "families in the same order"
        );
    }
}
