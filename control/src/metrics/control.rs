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

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
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

type Labels = Vec<(&'static str, String)>;

/// The metrics as OpenMetrics text.
pub fn render(m: &ControlMetrics, counts: &RequestCounts) -> String {
    let mut r = Registry::default();
    let g = |r: &mut Registry, name: &str, help: &str, v: u64| {
        let x = Gauge::<i64>::default();
        x.set(i64::try_from(v).unwrap_or(i64::MAX));
        r.register(name, help, x);
    };
    g(
        &mut r,
        "sluice_control_revision",
        "The store's current revision",
        m.revision,
    );
    g(
        &mut r,
        "sluice_control_objects",
        "Objects stored",
        m.objects as u64,
    );
    let watchers = Family::<Labels, Gauge>::default();
    r.register(
        "sluice_control_watchers",
        "Open watches of each node's agent",
        watchers.clone(),
    );
    let lag = Family::<Labels, Gauge>::default();
    r.register(
        "sluice_control_watch_lag_revisions",
        "Current revision minus the revision the node's agent last reported synced",
        lag.clone(),
    );
    for (node, w, synced) in &m.agents {
        let l = vec![("node", node.clone())];
        watchers.get_or_create(&l).set(i64::from(*w));
        lag.get_or_create(&l)
            .set(i64::try_from(m.revision.saturating_sub(*synced)).unwrap_or(i64::MAX));
    }
    let received = Family::<Labels, Counter>::default();
    r.register(
        "sluice_control_flow_events_received",
        "Flow events the node's agent pushed",
        received.clone(),
    );
    let agent_dropped = Family::<Labels, Counter>::default();
    r.register(
        "sluice_control_flow_events_agent_dropped",
        "Flow events the node's agent dropped instead of pushing, as it last reported",
        agent_dropped.clone(),
    );
    let held = Family::<Labels, Gauge>::default();
    r.register(
        "sluice_control_flow_events_held",
        "Flow events of the node held for Observe",
        held.clone(),
    );
    let streams = Family::<Labels, Gauge>::default();
    r.register(
        "sluice_control_flow_event_streams",
        "Open PushFlowEvents streams of the node",
        streams.clone(),
    );
    for (node, f) in &m.flows {
        let l = vec![("node", node.clone())];
        received.get_or_create(&l).inc_by(f.received);
        agent_dropped.get_or_create(&l).inc_by(f.agent_dropped);
        held.get_or_create(&l)
            .set(i64::try_from(f.held).unwrap_or(i64::MAX));
        streams.get_or_create(&l).set(i64::from(f.streams));
    }
    let requests = Family::<Labels, Counter>::default();
    r.register(
        "sluice_control_requests",
        "gRPC requests by method and status code",
        requests.clone(),
    );
    for ((method, code), n) in counts.snapshot() {
        requests
            .get_or_create(&vec![("method", method), ("code", code)])
            .inc_by(n);
    }
    let mut out = String::new();
    if encode(&mut out, &r).is_err() {
        out = "# EOF\n".into();
    }
    out
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
        let c = RequestCounts::default();
        c.inc("/sluice.control.v1.Control/Apply".into(), "0".into());
        c.inc("/sluice.control.v1.Control/Apply".into(), "0".into());
        let text = to_prometheus_text(&render(&m, &c));
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
}
