//! Fan-out benchmark (not a test): one `sluice-control` (embedded store, in this process, plaintext
//! on loopback) with N watching clients (the agent's `watch_cluster`, each on its own HTTP/2
//! connection), loaded with pods, services with EndpointSlices, and policies; then single-object
//! changes are applied one at a time and we measure the time from the Apply call to each watcher
//! holding that revision.
//!
//! `cargo run -p sluice-control --release --example watch_bench -- [watchers] [pods] [services] [policies] [changes]`
//! (defaults 100 10000 1000 1000 200). Prints p50/p99/max, memory (VmRSS/VmHWM of the whole
//! process: server and clients) and CPU time.

use std::time::{Duration, Instant};

use sluice_control::api::{self, Kind, object::Body};
use sluice_control::auth::Authenticator;
use sluice_control::client::{ClientConfig, ControlClient, watch_cluster};
use sluice_control::model::K8sObject;
use sluice_control::server::{ControlService, ServerConfig, serve};
use sluice_control::store::RedbStore;

fn arg(i: usize, default: usize) -> usize {
    std::env::args()
        .nth(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn k8s(v: serde_json::Value) -> api::Object {
    let o = K8sObject::from_value(v).expect("bench object");
    api::Object {
        body: Some(Body::K8s(o.to_proto())),
        revision: 0,
    }
}

fn service(i: usize) -> Vec<api::Object> {
    vec![
        k8s(
            serde_json::json!({"apiVersion":"v1","kind":"Service","metadata":{"name":format!("svc-{i}"),"namespace":"bench"},
            "spec":{"selector":{"app":format!("app-{i}")},"ports":[{"name":"http","port":80,"targetPort":8080}]}}),
        ),
        k8s(
            serde_json::json!({"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice",
            "metadata":{"name":format!("svc-{i}-1"),"namespace":"bench","labels":{"kubernetes.io/service-name":format!("svc-{i}")}},
            "addressType":"IPv4","ports":[{"name":"http","port":8080,"protocol":"TCP"}],
            "endpoints":(0..10).map(|j| serde_json::json!({"addresses":[format!("10.244.{}.{}", 1 + (i + j) % 100, 2 + j)],
                "conditions":{"ready":true,"serving":true,"terminating":false}})).collect::<Vec<_>>()}),
        ),
    ]
}

fn policy(i: usize, port: u16) -> api::Object {
    k8s(
        serde_json::json!({"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy",
        "metadata":{"name":format!("pol-{i}"),"namespace":"bench"},
        "spec":{"podSelector":{"matchLabels":{"app":format!("app-{i}")}},"policyTypes":["Ingress"],
            "ingress":[{"from":[{"podSelector":{"matchLabels":{"role":"client"}}},{"ipBlock":{"cidr":"192.168.0.0/16","except":["192.168.1.0/24"]}}],
                "ports":[{"protocol":"TCP","port":port}]}]}}),
    )
}

fn proc_status(field: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .map(|l| l[field.len()..].trim().to_string())
        .unwrap_or_default()
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the struct we pass and reads nothing else.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (watchers, pods, services, policies, changes) = (
        arg(1, 100),
        arg(2, 10_000),
        arg(3, 1_000),
        arg(4, 1_000),
        arg(5, 200),
    );
    let dir = tempfile::tempdir()?;
    let store = RedbStore::open(dir.path())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let svc = ControlService::new(store, ServerConfig::default());
    tokio::spawn(serve(
        listener,
        svc,
        Authenticator::insecure_anonymous(),
        None,
        std::future::pending(),
    ));
    let cfg = ClientConfig::new(format!("http://{addr}"));
    let client = ControlClient::connect(&cfg).await?;

    // Load.
    let t = Instant::now();
    client
        .apply(vec![k8s(
            serde_json::json!({"apiVersion":"v1","kind":"Namespace","metadata":{"name":"bench"}}),
        )])
        .await?;
    let nodes = 100.min(pods.max(1));
    for n in 0..nodes {
        client
            .register_node(
                &format!("node-{n}"),
                format!("192.168.{}.{}", n / 250, n % 250 + 1).parse()?,
                [2, 0, 0, 0, 0, n as u8],
            )
            .await?;
    }
    let batch = 500;
    let pod_objects: Vec<api::Object> = (0..pods)
        .map(|i| api::Object {
            body: Some(Body::Pod(api::Pod {
                namespace: "bench".into(),
                name: format!("pod-{i}"),
                node: format!("node-{}", i % nodes),
                ip: format!("10.244.{}.{}", 1 + i % nodes, 2 + i / nodes),
                labels: [("app".to_string(), format!("app-{}", i % services.max(1)))].into(),
                ports: vec![api::ContainerPort {
                    name: "http".into(),
                    port: 8080,
                    protocol: "TCP".into(),
                }],
                container_id: format!("{i:064x}"),
            })),
            revision: 0,
        })
        .collect();
    for chunk in pod_objects.chunks(batch) {
        client.apply(chunk.to_vec()).await?;
    }
    let svc_objects: Vec<api::Object> = (0..services).flat_map(service).collect();
    for chunk in svc_objects.chunks(batch) {
        client.apply(chunk.to_vec()).await?;
    }
    let pol_objects: Vec<api::Object> = (0..policies).map(|i| policy(i, 8080)).collect();
    for chunk in pol_objects.chunks(batch) {
        client.apply(chunk.to_vec()).await?;
    }
    let loaded = client.list(Kind::Unspecified, "").await?;
    println!(
        "loaded {} objects ({pods} pods, {services} services + {services} EndpointSlices, {policies} policies, {nodes} nodes) in {:.2?}, revision {}",
        loaded.objects.len(),
        t.elapsed(),
        loaded.revision
    );

    // Watchers: initial sync.
    let t = Instant::now();
    let mut ws: Vec<_> = (0..watchers)
        .map(|i| watch_cluster(cfg.clone(), Some(format!("node-{}", i % nodes))))
        .collect();
    for w in &mut ws {
        w.wait_for(|s| s.revision >= loaded.revision).await?;
    }
    println!(
        "{watchers} watchers hold the full state (snapshot of {} objects) after {:.2?}",
        ws[0].state().len(),
        t.elapsed()
    );
    println!(
        "memory after sync: VmRSS {} (peak VmHWM {})",
        proc_status("VmRSS:"),
        proc_status("VmHWM:")
    );

    // Changes: alternate a policy edit and a Service's endpoints edit; one at a time.
    let cpu0 = cpu_seconds();
    let wall0 = Instant::now();
    let mut per_watcher = Vec::with_capacity(changes * watchers);
    let mut to_all = Vec::with_capacity(changes);
    let mut apply_rtt = Vec::with_capacity(changes);
    let mut fanout = Vec::with_capacity(changes);
    for c in 0..changes {
        let object = if c % 2 == 0 {
            policy(c % policies.max(1), 9000 + c as u16)
        } else {
            service(c % services.max(1)).remove(1)
        };
        let t0 = Instant::now();
        let resp = client.apply(vec![object]).await?;
        apply_rtt.push(t0.elapsed());
        let rev = resp.revision;
        let waits = ws.iter_mut().map(|w| async move {
            w.wait_for(|s| s.revision >= rev)
                .await
                .map(|_| Instant::now())
        });
        let done = futures::future::join_all(waits).await;
        let mut last = Duration::ZERO;
        for d in done {
            let d = d?.duration_since(t0);
            last = last.max(d);
            per_watcher.push(d);
        }
        to_all.push(last);
        fanout.push(last.saturating_sub(apply_rtt[c]));
    }
    let wall = wall0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    per_watcher.sort();
    to_all.sort();
    apply_rtt.sort();
    fanout.sort();
    println!("{changes} changes, one at a time, {watchers} watchers:");
    println!(
        "  apply -> a watcher has it:   p50 {:.2?}  p99 {:.2?}  max {:.2?}",
        pct(&per_watcher, 0.5),
        pct(&per_watcher, 0.99),
        per_watcher.last().copied().unwrap_or_default()
    );
    println!(
        "  apply -> every watcher has it: p50 {:.2?}  p99 {:.2?}  max {:.2?}",
        pct(&to_all, 0.5),
        pct(&to_all, 0.99),
        to_all.last().copied().unwrap_or_default()
    );
    println!(
        "  Apply answered -> every watcher has it (fan-out): p50 {:.2?}  p99 {:.2?}",
        pct(&fanout, 0.5),
        pct(&fanout, 0.99)
    );
    println!(
        "  Apply RPC (commit, fsync):    p50 {:.2?}  p99 {:.2?}",
        pct(&apply_rtt, 0.5),
        pct(&apply_rtt, 0.99)
    );
    println!(
        "  CPU {cpu:.2} s over {wall:.2} s wall ({:.0}% of one core), server and clients together",
        100.0 * cpu / wall
    );
    println!(
        "memory at end: VmRSS {} (peak VmHWM {})",
        proc_status("VmRSS:"),
        proc_status("VmHWM:")
    );
    Ok(())
}
