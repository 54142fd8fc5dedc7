//! The exposition side of Prometheus metrics, shared by the control plane and the node agent:
//! OpenMetrics text (what `prometheus-client` encodes) turned into the Prometheus text format, and
//! a minimal `GET /metrics` HTTP endpoint that serves either, as the scraper asks.
//!
//! Nothing here knows a metric: callers pass a function that renders their registry. This module
//! needs no store and no `prometheus-client`, so the agent gets it with the `client` feature.

use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// OpenMetrics text in the Prometheus text format 0.0.4 (counter families named with `_total`,
/// no `# UNIT`/`# EOF`), for scrapers that do not ask for OpenMetrics (`promtool check metrics`).
pub fn to_prometheus_text(open_metrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = open_metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open_metrics.len() + 16 * counters.len());
    for l in open_metrics.lines() {
        if l == "# EOF" || l.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, l.strip_prefix(p)?)));
        match meta {
            Some((p, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    let _ = writeln!(out, "{p}{name}_total {tail}");
                } else {
                    let _ = writeln!(out, "{l}");
                }
            }
            None => {
                let _ = writeln!(out, "{l}");
            }
        }
    }
    out
}

/// Serve `GET /metrics` on `addr` with the text `render` returns (OpenMetrics) until the task is
/// dropped.
pub async fn serve_http<F, Fut>(addr: SocketAddr, render: F) -> std::io::Result<()>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = String> + Send,
{
    let listener = TcpListener::bind(addr).await?;
    loop {
        let (mut conn, _) = listener.accept().await?;
        let render = render.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            while n < buf.len() {
                match conn.read(&mut buf[n..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(k) => n += k,
                }
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let (status, ctype, body) = if !head.starts_with("GET /metrics ") {
                (
                    "404 Not Found",
                    "text/plain",
                    "only GET /metrics here\n".to_owned(),
                )
            } else if head
                .to_ascii_lowercase()
                .contains("application/openmetrics-text")
            {
                (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    render().await,
                )
            } else {
                (
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    to_prometheus_text(&render().await),
                )
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}
