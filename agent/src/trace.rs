//! `Trace` of the local API (`sluicectl trace`): build the packet a request describes (or take the
//! frame it carries), run it through the pipeline over this node's current tables and the
//! conntrack of the worker that owns its flow, read-only ([`sluice_dataplane::pipeline::trace`]:
//! the same stage code as the worker's, nothing counted, inserted, emitted or allocated from the
//! NAT port space), and name every stage's decision for a person.
//!
//! The run happens on the worker thread (a [`TraceJob`] through its command channel, between two
//! batches), because the worker owns its conntrack; the resolution of names before and the
//! rendering after happen here, on the API task. A frame that leaves for another node comes back
//! as it would leave (VXLAN-encapsulated) with that node's name, so the caller can trace it there.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use sluice_control::agent_api::{NodeTrace, TraceRequest, TraceStep as StepMsg};
use sluice_dataplane::conntrack::{CtEntry, CtState, FlowDir};
use sluice_dataplane::flow::{FlowKey, proto};
use sluice_dataplane::frame::Frame;
use sluice_dataplane::parse::IcmpKind;
use sluice_dataplane::pipeline::{self, FlowNat, WorkerState};
use sluice_dataplane::policy::{Direction, Exempt, PolicyVerdict, SideExplanation};
use sluice_dataplane::probe::{Probe, ProbeL4};
use sluice_dataplane::route::Route;
use sluice_dataplane::service::{Choice, ServiceOutcome};
use sluice_dataplane::tables::Tables;
use sluice_dataplane::trace::{CtStep, TraceStep};
use sluice_dataplane::verdict::{PortId, Verdict};
use sluice_dataplane::wire::ethernet::Mac;
use sluice_dataplane::wire::tcp;
use tonic::Status;

use super::tables::Snapshot;

/// Room before a traced frame for the headers encapsulation pushes (VXLAN needs 50).
const HEADROOM: usize = 128;
/// The source MAC of a probe that does not come from a pod of this node.
const OUTSIDE_MAC: Mac = Mac([0x02, 0x54, 0x52, 0x41, 0x43, 0x45]);

/// A frame to trace on a worker.
#[derive(Clone, Debug)]
pub struct TraceJob {
    pub frame: Vec<u8>,
    pub ingress: PortId,
}

/// What the worker's pipeline said about a [`TraceJob`].
#[derive(Clone, Debug)]
pub struct TraceRun {
    pub worker: usize,
    pub generation: u64,
    pub verdict: Verdict,
    pub steps: Vec<TraceStep>,
    /// The frame as the pipeline left it (rewritten, encapsulated when forwarded to a node).
    pub frame: Vec<u8>,
}

/// Trace `job` over `state` (a worker's, borrowed shared) at `now_ns` of that worker's clock.
pub fn run(
    worker: usize,
    snapshot: &Snapshot,
    state: &WorkerState,
    now_ns: u64,
    job: &TraceJob,
) -> TraceRun {
    let len = job.frame.len();
    let mut buf = vec![0u8; HEADROOM + len];
    buf[HEADROOM..].copy_from_slice(&job.frame);
    let mut frame = Frame::new(&mut buf, HEADROOM, len);
    let mut steps = Vec::new();
    let verdict = pipeline::trace(
        &snapshot.tables,
        state,
        now_ns,
        job.ingress,
        &mut frame,
        &mut steps,
    );
    TraceRun {
        worker,
        generation: snapshot.generation,
        verdict,
        steps,
        frame: frame.head().to_vec(),
    }
}

/// What the names in a request and a trace resolve against: the snapshot, and pod names by
/// address (this node's and, in control-plane mode, every node's).
pub struct Names<'a> {
    pub snapshot: &'a Snapshot,
    pub pods: &'a HashMap<Ipv4Addr, String>,
}

impl Names<'_> {
    fn pod_ip(&self, name: &str) -> Option<Ipv4Addr> {
        self.pods
            .iter()
            .find(|(_, n)| n.as_str() == name)
            .map(|(ip, _)| *ip)
    }

    /// `ip` with its pod name when known: "10.244.1.2 (demo/client)".
    fn ip(&self, ip: [u8; 4]) -> String {
        let a = Ipv4Addr::from(ip);
        match self.pods.get(&a) {
            Some(n) => format!("{a} ({n})"),
            None => a.to_string(),
        }
    }

    fn endpoint(&self, ip: [u8; 4], port: u16, protocol: u8) -> String {
        if matches!(protocol, proto::TCP | proto::UDP | proto::SCTP) {
            format!("{}:{port}", self.ip(ip))
        } else {
            self.ip(ip)
        }
    }

    fn key(&self, k: &FlowKey) -> String {
        format!(
            "{} {} -> {}",
            protocol_name(k.proto),
            self.endpoint(k.src, k.src_port, k.proto),
            self.endpoint(k.dst, k.dst_port, k.proto)
        )
    }

    fn port(&self, port: PortId) -> String {
        let t = &self.snapshot.tables;
        if port == t.node.uplink {
            return format!("the uplink (ifindex {})", port.0);
        }
        match self.snapshot.pods.values().find(|p| p.port == port) {
            Some(p) => format!(
                "the host veth of {} (ifindex {})",
                self.ip(p.ip.octets()),
                port.0
            ),
            None => format!("ifindex {}", port.0),
        }
    }

    fn tables(&self) -> &Tables {
        &self.snapshot.tables
    }
}

fn protocol_name(p: u8) -> String {
    super::events::protocol_name(p)
}

/// Build the frame and ingress port a request describes.
pub fn job_for(req: &TraceRequest, names: &Names<'_>) -> Result<TraceJob, Status> {
    let snap = names.snapshot;
    let t = names.tables();
    if !req.frame.is_empty() {
        let ingress = match req.ingress_ifindex {
            0 => auto_ingress(&req.frame, snap),
            n => PortId(n),
        };
        return Ok(TraceJob {
            frame: req.frame.clone(),
            ingress,
        });
    }
    if req.from.is_empty() || req.to.is_empty() {
        return Err(Status::invalid_argument(
            "a trace needs `from` and `to` (or a frame)",
        ));
    }
    let protocol = match req.protocol.to_ascii_lowercase().as_str() {
        "" | "tcp" => proto::TCP,
        "udp" => proto::UDP,
        "icmp" => proto::ICMP,
        other => {
            return Err(Status::invalid_argument(format!(
                "protocol {other:?}: expected tcp, udp or icmp"
            )));
        }
    };
    let src = resolve_host(&req.from, names)
        .ok_or_else(|| Status::invalid_argument(format!("from {:?}: {}", req.from, HOST_FORMS)))?;
    let (dst, to_port) = resolve_dest(&req.to, protocol, names)?;
    let dst_port = match (to_port, req.dst_port) {
        (Some(p), _) => p,
        (None, 0) => 80,
        (None, p) => u16::try_from(p)
            .map_err(|_| Status::invalid_argument(format!("dst_port {p} is out of range")))?,
    };
    let src_port = match req.src_port {
        0 => 40000,
        p => u16::try_from(p)
            .map_err(|_| Status::invalid_argument(format!("src_port {p} is out of range")))?,
    };
    let flags = parse_flags(&req.tcp_flags)?;
    let (ingress, src_mac, dst_mac) = match t.local_pod(src.octets()) {
        Some(p) => (p.port, p.pod_mac, p.host_mac),
        None => (t.node.uplink, OUTSIDE_MAC, t.node.underlay_mac),
    };
    let l4 = match protocol {
        proto::TCP => ProbeL4::Tcp {
            src_port,
            dst_port,
            flags,
        },
        proto::UDP => ProbeL4::Udp { src_port, dst_port },
        _ => ProbeL4::IcmpEcho {
            id: src_port,
            seq: 1,
            reply: false,
        },
    };
    let probe = Probe {
        src_mac,
        dst_mac,
        src: src.octets(),
        dst: dst.octets(),
        ttl: 64,
        l4,
    };
    Ok(TraceJob {
        frame: probe.frame(b""),
        ingress,
    })
}

const HOST_FORMS: &str = "expected a pod (namespace/name) or an IPv4 address";

/// The port a captured frame came in on: the host veth of the pod whose address is its IPv4
/// source, else the uplink.
fn auto_ingress(frame: &[u8], snap: &Snapshot) -> PortId {
    let t = &snap.tables;
    let src = frame
        .get(12..14)
        .filter(|e| *e == [0x08, 0x00])
        .and_then(|_| frame.get(26..30))
        .and_then(|s| <[u8; 4]>::try_from(s).ok());
    match src.and_then(|s| t.local_pod(s)) {
        Some(p) => p.port,
        None => t.node.uplink,
    }
}

fn resolve_host(s: &str, names: &Names<'_>) -> Option<Ipv4Addr> {
    if let Ok(ip) = s.parse::<Ipv4Addr>() {
        return Some(ip);
    }
    if s.contains('/') {
        return names.pod_ip(s);
    }
    None
}

/// The destination address and port a `to` names.
fn resolve_dest(
    s: &str,
    protocol: u8,
    names: &Names<'_>,
) -> Result<(Ipv4Addr, Option<u16>), Status> {
    let bad = |why: String| Status::invalid_argument(format!("to {s:?}: {why}"));
    if let Some(svc) = s.strip_prefix("svc/") {
        let (name, port) = match svc.rsplit_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (svc, None),
        };
        let k8s = |p: &sluice_dataplane::flow::Protocol| {
            p.number() == protocol || protocol == proto::ICMP
        };
        let found: Vec<_> = names
            .snapshot
            .services
            .iter()
            .filter(|sp| sp.name.split_once(':').map_or(sp.name.as_str(), |(n, _)| n) == name)
            .filter(|sp| k8s(&sp.protocol))
            .filter(|sp| match port {
                None => true,
                Some(p) => {
                    sp.name.rsplit_once(':').is_some_and(|(_, n)| n == p)
                        || p.parse::<u16>().is_ok_and(|n| n == sp.port)
                }
            })
            .collect();
        return match found.as_slice() {
            [one] => Ok((one.cluster_ip, Some(one.port))),
            [] => Err(bad(format!(
                "no Service port {name}{} of this protocol in this node's tables",
                port.map(|p| format!(":{p}")).unwrap_or_default()
            ))),
            many => Err(bad(format!(
                "the Service has {} ports; name one ({})",
                many.len(),
                many.iter()
                    .map(|sp| sp.port.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        };
    }
    if let Ok(sa) = s.parse::<SocketAddrV4>() {
        return Ok((*sa.ip(), Some(sa.port())));
    }
    resolve_host(s, names).map(|ip| (ip, None)).ok_or_else(|| {
        bad("expected a pod (namespace/name), svc/namespace/name[:port] or IPv4[:port]".into())
    })
}

fn parse_flags(s: &str) -> Result<u8, Status> {
    if s.is_empty() {
        return Ok(tcp::flags::SYN);
    }
    let mut f = 0u8;
    for w in s.split([',', '|', '+']) {
        f |= match w.trim().to_ascii_uppercase().as_str() {
            "SYN" => tcp::flags::SYN,
            "ACK" => tcp::flags::ACK,
            "FIN" => tcp::flags::FIN,
            "RST" => tcp::flags::RST,
            "PSH" => tcp::flags::PSH,
            "URG" => 0x20,
            "" => 0,
            other => {
                return Err(Status::invalid_argument(format!(
                    "TCP flag {other:?}: expected SYN, ACK, FIN, RST, PSH or URG"
                )));
            }
        };
    }
    Ok(f)
}

fn flags_name(f: u8) -> String {
    let names = [
        (tcp::flags::SYN, "SYN"),
        (tcp::flags::ACK, "ACK"),
        (tcp::flags::FIN, "FIN"),
        (tcp::flags::RST, "RST"),
        (tcp::flags::PSH, "PSH"),
    ];
    let v: Vec<&str> = names
        .iter()
        .filter(|(b, _)| f & b != 0)
        .map(|(_, n)| *n)
        .collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(",")
    }
}

fn state_name(s: CtState) -> String {
    format!("{s:?}")
}

fn entry_text(e: &CtEntry<FlowNat>, names: &Names<'_>) -> String {
    let o = e.key(FlowDir::Original);
    let r = e.key(FlowDir::Reply);
    let mut s = format!("{} [{}]", names.key(o), state_name(e.state()));
    if *r != o.reversed() {
        s.push_str(&format!(", replies as {}", names.key(r)));
    }
    s
}

fn verdict_words(v: Verdict) -> (&'static str, String) {
    match v {
        Verdict::Forward(_) | Verdict::Segment(_) | Verdict::Steer(_) => {
            ("FORWARDED", String::new())
        }
        Verdict::Drop(r) => ("DROPPED", r.as_str().to_owned()),
        Verdict::PassToKernel => ("TO_KERNEL", String::new()),
        Verdict::FragNeeded(_) => ("FRAG_NEEDED", String::new()),
    }
}

fn side_text(what: &str, s: &SideExplanation, t: &Tables) -> String {
    let policy = |id| {
        t.policy
            .policy_name(id)
            .map(str::to_owned)
            .unwrap_or_else(|| format!("#{}", id.0))
    };
    if !s.pod {
        return format!("{what}: not a pod, no policy");
    }
    if let Some(x) = s.exempt {
        return format!(
            "{what}: exempt ({})",
            match x {
                Exempt::SamePod => "a pod to itself",
                Exempt::NodeAddress => "from this node's address",
            }
        );
    }
    if !s.isolated() {
        return format!("{what}: not isolated, allowed");
    }
    let by: Vec<String> = s.selected_by.iter().map(|&p| policy(p)).collect();
    if s.allowed_by.is_empty() {
        return format!("{what}: isolated by {}, no rule allows", by.join(", "));
    }
    let rules: Vec<String> = s
        .allowed_by
        .iter()
        .map(|r| format!("{} rule {}", policy(r.policy), r.rule))
        .collect();
    format!(
        "{what}: isolated by {}, allowed by {}",
        by.join(", "),
        rules.join(", ")
    )
}

/// Name every step of `run` for a person, and say where the frame goes next.
pub fn render(node: &str, ingress: PortId, run: &TraceRun, names: &Names<'_>) -> NodeTrace {
    let t = names.tables();
    let mut out = NodeTrace {
        node: node.to_owned(),
        worker: u32::try_from(run.worker).unwrap_or(u32::MAX),
        generation: run.generation,
        ingress_ifindex: ingress.0,
        ..Default::default()
    };
    let mut remote = None;
    for step in &run.steps {
        let (result, detail): (&str, String) = match *step {
            TraceStep::Decap { from, result } => match result {
                Ok(()) => (
                    "ok",
                    format!("VXLAN VNI {} from {}", t.node.vni, Ipv4Addr::from(from)),
                ),
                Err(r) => (
                    "dropped",
                    format!("VXLAN from {}: {}", Ipv4Addr::from(from), r.as_str()),
                ),
            },
            TraceStep::Parsed {
                key,
                tcp_flags,
                ip_len,
                ttl,
                icmp,
            } => {
                let mut d = format!("{}, {ip_len} bytes IPv4, TTL {ttl}", names.key(&key));
                if key.proto == proto::TCP {
                    d.push_str(&format!(", flags {}", flags_name(tcp_flags)));
                }
                match icmp {
                    IcmpKind::Echo => d.push_str(", ICMP echo"),
                    IcmpKind::Error { .. } => d.push_str(", ICMP error"),
                    IcmpKind::Other => d.push_str(", ICMP (other)"),
                    IcmpKind::None => {}
                }
                ("ipv4", d)
            }
            TraceStep::NotParsed(v) => match v {
                Verdict::Drop(r) => ("invalid", r.as_str().to_owned()),
                _ => ("not_ipv4", "not an IPv4 packet".to_owned()),
            },
            TraceStep::Source {
                pod,
                spoofed,
                external,
                partial,
            } => {
                let part = if partial { ", L4 checksum partial" } else { "" };
                if spoofed {
                    (
                        "spoofed",
                        format!(
                            "the source address is not that of the pod on {}",
                            names.port(ingress)
                        ),
                    )
                } else if pod {
                    ("pod", format!("from {}{part}", names.port(ingress)))
                } else if external {
                    (
                        "uplink",
                        format!("from outside the cluster on {}{part}", names.port(ingress)),
                    )
                } else {
                    ("tunnel", format!("from another node over VXLAN{part}"))
                }
            }
            TraceStep::Conntrack(c) => match c {
                CtStep::Miss => ("miss", "no entry: a new flow".to_owned()),
                CtStep::Hit { dir, entry, after } => (
                    "hit",
                    format!(
                        "{} direction of {}, state {} -> {}",
                        match dir {
                            FlowDir::Original => "original",
                            FlowDir::Reply => "reply",
                        },
                        entry_text(&entry, names),
                        state_name(entry.state()),
                        state_name(after)
                    ),
                ),
                CtStep::Reopened { entry } => (
                    "reopened",
                    format!(
                        "a SYN over closed {}: decided as a new flow",
                        entry_text(&entry, names)
                    ),
                ),
                CtStep::Insert {
                    orig,
                    reply,
                    result,
                } => (
                    "new_entry",
                    format!(
                        "would record {}, replies as {}{} (a trace records nothing)",
                        names.key(&orig),
                        names.key(&reply),
                        match result {
                            Ok(()) => String::new(),
                            Err(e) => format!(": fails ({e:?})"),
                        }
                    ),
                ),
                CtStep::Related { entry, .. } => (
                    "related",
                    format!("an ICMP error about {}", entry_text(&entry, names)),
                ),
                CtStep::Unrelated { quoted } => (
                    "unrelated",
                    match quoted {
                        Some(q) => format!(
                            "an ICMP error about {}, which no tracked flow sent",
                            names.key(&q)
                        ),
                        None => "an ICMP error without a readable quoted datagram".to_owned(),
                    },
                ),
            },
            TraceStep::Service { svc, outcome, how } => {
                let name = svc
                    .and_then(|s| t.service(s))
                    .map(|s| s.spec.name.clone())
                    .unwrap_or_default();
                match outcome {
                    ServiceOutcome::NotService => ("not_service", "not a Service address".into()),
                    ServiceOutcome::NoBackend => {
                        ("no_backend", format!("Service {name}: no ready backend"))
                    }
                    ServiceOutcome::Backend {
                        ip,
                        port,
                        node_port,
                        ..
                    } => {
                        let how = match how {
                            Choice::Maglev {
                                slot,
                                backend,
                                affinity,
                            } => format!(
                                "Maglev slot {slot} -> backend #{backend}{}",
                                if affinity {
                                    " (sessionAffinity: hash of the client address)"
                                } else {
                                    ""
                                }
                            ),
                            Choice::Remembered { backend } => {
                                format!("sessionAffinity: this client's backend #{backend}")
                            }
                            Choice::None => String::new(),
                        };
                        (
                            "backend",
                            format!(
                                "Service {name}{}: {how}: {}",
                                if node_port { " (NodePort)" } else { "" },
                                names.endpoint(ip, port, proto::TCP)
                            ),
                        )
                    }
                }
            }
            TraceStep::Policy { query, verdict } => {
                let e = t.policy.explain(&query);
                let d = format!(
                    "{}; {}",
                    side_text("egress of the source", &e.egress, t),
                    side_text("ingress of the destination", &e.ingress, t)
                );
                match verdict {
                    PolicyVerdict::Allow { .. } => ("allowed", d),
                    PolicyVerdict::Deny {
                        direction: Direction::Egress,
                    } => ("denied", format!("denied by egress policy: {d}")),
                    PolicyVerdict::Deny {
                        direction: Direction::Ingress,
                    } => ("denied", format!("denied by ingress policy: {d}")),
                }
            }
            TraceStep::Nat { from, to, snat } => {
                let word = if snat {
                    "snat"
                } else if from.dst != to.dst || from.dst_port != to.dst_port {
                    "dnat"
                } else {
                    "reverse"
                };
                (
                    word,
                    format!("{} rewritten to {}", names.key(&from), names.key(&to)),
                )
            }
            TraceStep::Route { dst, route } => match route {
                Route::Local(p) => (
                    "local",
                    format!(
                        "{} is a pod of this node, on {}",
                        names.ip(dst),
                        names.port(p.port)
                    ),
                ),
                Route::Remote(r) => {
                    let node = names
                        .snapshot
                        .remotes
                        .iter()
                        .find(|n| n.underlay_ip == r.underlay_ip)
                        .map(|n| n.name.clone())
                        .unwrap_or_default();
                    remote = Some((node.clone(), r.underlay_ip));
                    (
                        "remote",
                        format!(
                            "{} is on node {node} ({}): VXLAN VNI {} to {}:{}, VTEP MAC {}, inner MTU {}",
                            names.ip(dst),
                            r.pod_cidr,
                            t.node.vni,
                            r.underlay_ip,
                            t.node.vxlan_port,
                            r.vtep_mac,
                            t.vxlan_mtu
                        ),
                    )
                }
                Route::Kernel => (
                    "kernel",
                    format!(
                        "{} is this node or outside the cluster: the kernel routes it",
                        names.ip(dst)
                    ),
                ),
                Route::NoRoute => (
                    "no_route",
                    format!(
                        "{} is in the cluster CIDR but no node's or pod's",
                        names.ip(dst)
                    ),
                ),
            },
            TraceStep::Verdict(v) => {
                let (word, reason) = verdict_words(v);
                let d = match v {
                    Verdict::Forward(p) | Verdict::Segment(p) => {
                        format!("transmitted on {}", names.port(p))
                    }
                    Verdict::Steer(w) => format!("handed to worker {w}"),
                    Verdict::Drop(r) => format!("dropped: {}", r.as_str()),
                    Verdict::PassToKernel => "passed to the kernel's stack".to_owned(),
                    Verdict::FragNeeded(m) => {
                        format!(
                            "too large for the tunnel ({m} bytes), DF set: ICMP fragmentation needed to the sender"
                        )
                    }
                };
                out.verdict = word.to_owned();
                out.drop_reason = reason;
                if let Verdict::Forward(p) | Verdict::Segment(p) = v {
                    out.egress_ifindex = p.0;
                }
                (word, d)
            }
        };
        out.steps.push(StepMsg {
            stage: step.stage().as_str().to_owned(),
            result: result.to_owned(),
            detail,
        });
    }
    if let (Verdict::Forward(p) | Verdict::Segment(p), Some((node, ip))) = (run.verdict, remote)
        && p == t.node.uplink
    {
        out.next_node = node;
        out.next_underlay_ip = ip.to_string();
        if matches!(run.verdict, Verdict::Forward(_)) {
            out.next_frame = run.frame.clone();
        }
    }
    out
}

impl super::Agent {
    /// Answer a `Trace` request: resolve it against the current tables, run it on the worker that
    /// owns its flow, name the steps.
    pub async fn trace(&self, req: TraceRequest) -> Result<NodeTrace, Status> {
        let snapshot = self.publisher.load();
        let mut pods: HashMap<Ipv4Addr, String> = self
            .registry
            .lock()
            .await
            .pods()
            .filter(|p| !p.name.is_empty())
            .map(|p| (p.ip, format!("{}/{}", p.namespace, p.name)))
            .collect();
        self.control.pod_names(&mut pods);
        let names = Names {
            snapshot: &snapshot,
            pods: &pods,
        };
        let job = job_for(&req, &names)?;
        let ingress = job.ingress;
        let n = self.workers.len();
        if n == 0 {
            return Err(Status::unavailable("the agent has no worker running"));
        }
        let w = sluice_dataplane::steer::owner(&snapshot.tables, &job.frame, ingress, n)
            .unwrap_or_else(|| super::port_worker(ingress, n))
            .min(n - 1);
        let run = self.workers[w]
            .trace(job)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(render(&self.config.node_name, ingress, &run, &names))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NodeConfig;
    use crate::manifests::{ClusterObjects, parse_documents};
    use crate::registry::PodRecord;

    const OBJECTS: &str = r#"
metadata: {name: web, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
---
metadata: {name: empty, namespace: demo}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80, targetPort: 8080}]
"#;
    const SLICES: &str = r#"
metadata: {name: web-a, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
  - addresses: [10.244.1.3]
"#;
    const POLICIES: &str = r#"
metadata: {name: db-from-web, namespace: demo}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress]
  ingress:
    - from: [{podSelector: {matchLabels: {app: web}}}]
      ports: [{port: 5432}]
---
metadata: {name: locked-down, namespace: demo}
spec:
  podSelector: {matchLabels: {app: locked}}
  policyTypes: [Egress]
"#;

    fn pod(i: u8, name: &str, app: &str) -> PodRecord {
        PodRecord {
            container_id: format!("c{i}"),
            ifname: "eth0".into(),
            netns: String::new(),
            host_ifname: format!("vp{i}"),
            host_ifindex: 10 + u32::from(i),
            ip: Ipv4Addr::new(10, 244, 1, i),
            pod_mac: crate::config::Mac([2, 0, 0, 0, 1, i]),
            host_mac: crate::config::Mac([2, 0, 0, 0, 2, i]),
            namespace: "demo".into(),
            name: name.into(),
            labels: [("app".to_owned(), app.to_owned())].into(),
            ports: Vec::new(),
        }
    }

    /// The demo node n1 (pod CIDR 10.244.1.0/24, peer n2): client, web (backend of demo/web),
    /// db (ingress only from web on 5432), locked (egress isolated, no rule).
    fn snapshot() -> (Snapshot, HashMap<Ipv4Addr, String>) {
        let config: NodeConfig = serde_saphyr::from_str(
            r#"
node_name: n1
underlay: {interface: up0, address: 192.168.50.1}
pod_cidr: 10.244.1.0/24
vtep: {mac: "0e:00:00:00:01:00"}
peers:
  - {name: n2, underlay_ip: 192.168.50.2, underlay_mac: "0e:00:00:00:02:01", pod_cidr: 10.244.2.0/24, vtep_mac: "0e:00:00:00:02:00"}
"#,
        )
        .unwrap();
        let objects = ClusterObjects {
            services: parse_documents(OBJECTS).unwrap(),
            endpoint_slices: parse_documents(SLICES).unwrap(),
            network_policies: parse_documents(POLICIES).unwrap(),
            ..Default::default()
        };
        let pods = [
            pod(2, "client", "client"),
            pod(3, "web", "web"),
            pod(4, "db", "db"),
            pod(5, "locked", "locked"),
        ];
        let names = pods
            .iter()
            .map(|p| (p.ip, format!("{}/{}", p.namespace, p.name)))
            .collect();
        let links = crate::tables::tests::LINKS;
        (
            Snapshot::build(1, &config, links, &objects, pods.iter()).unwrap(),
            names,
        )
    }

    /// One worked example per verdict kind (printed: control/README.md shows them), each traced
    /// over an empty worker state, as `sluicectl trace` renders it.
    #[test]
    fn worked_examples_per_verdict_kind() {
        let (snap, pods) = snapshot();
        let names = Names {
            snapshot: &snap,
            pods: &pods,
        };
        let state = WorkerState::new(pipeline::WorkerConfig {
            conntrack: sluice_dataplane::conntrack::CtConfig::with_capacity(64),
            affinity_capacity: 64,
        });
        let cases = [
            ("demo/client", "svc/demo/web:http", "tcp", "FORWARDED", ""),
            (
                "demo/client",
                "10.244.1.4:5432",
                "tcp",
                "DROPPED",
                "policy_denied_ingress",
            ),
            (
                "demo/locked",
                "demo/web",
                "tcp",
                "DROPPED",
                "policy_denied_egress",
            ),
            (
                "demo/client",
                "svc/demo/empty",
                "tcp",
                "DROPPED",
                "no_backend",
            ),
            ("demo/client", "10.244.1.200", "icmp", "DROPPED", "no_route"),
            ("demo/client", "1.1.1.1:443", "tcp", "TO_KERNEL", ""),
            ("demo/client", "10.244.2.7:8080", "udp", "FORWARDED", ""),
        ];
        for (from, to, protocol, verdict, reason) in cases {
            let req = TraceRequest {
                from: from.into(),
                to: to.into(),
                protocol: protocol.into(),
                ..Default::default()
            };
            let job = job_for(&req, &names).unwrap();
            let ingress = job.ingress;
            let run = run(0, &snap, &state, 1, &job);
            let t = render("n1", ingress, &run, &names);
            println!(
                "$ sluicectl trace --from {from} --to {to} --protocol {protocol}\n{}",
                sluice_control::trace::to_table(std::slice::from_ref(&t), "")
            );
            assert_eq!(
                (t.verdict.as_str(), t.drop_reason.as_str()),
                (verdict, reason),
                "{t:?}"
            );
            assert_eq!(t.steps.last().map(|s| s.stage.as_str()), Some("verdict"));
        }
        assert!(state.conntrack.is_empty(), "traces insert nothing");
    }

    #[test]
    fn a_frame_to_another_node_leaves_encapsulated_and_is_traced_there() {
        let (snap, pods) = snapshot();
        let names = Names {
            snapshot: &snap,
            pods: &pods,
        };
        let state = WorkerState::new(pipeline::WorkerConfig {
            conntrack: sluice_dataplane::conntrack::CtConfig::with_capacity(64),
            affinity_capacity: 64,
        });
        let req = TraceRequest {
            from: "demo/client".into(),
            to: "10.244.2.7:8080".into(),
            ..Default::default()
        };
        let job = job_for(&req, &names).unwrap();
        let t = render("n1", job.ingress, &run(0, &snap, &state, 1, &job), &names);
        assert_eq!(t.next_node, "n2");
        assert_eq!(t.next_underlay_ip, "192.168.50.2");
        // Outer IPv4 to n2's underlay address, UDP 8472.
        assert_eq!(&t.next_frame[30..34], &[192, 168, 50, 2]);
        assert_eq!(&t.next_frame[36..38], &8472u16.to_be_bytes());
    }

    #[test]
    fn requests_that_name_nothing_known_are_invalid_argument() {
        let (snap, pods) = snapshot();
        let names = Names {
            snapshot: &snap,
            pods: &pods,
        };
        for (from, to, protocol) in [
            ("demo/nobody", "10.96.0.10:80", "tcp"),
            ("demo/client", "svc/demo/none", "tcp"),
            ("demo/client", "svc/demo/web:https", "tcp"),
            ("demo/client", "10.96.0.10:99999", "tcp"),
            ("demo/client", "10.96.0.10:80", "sctp"),
            ("", "10.96.0.10:80", "tcp"),
            ("not an address", "10.96.0.10:80", "tcp"),
        ] {
            let req = TraceRequest {
                from: from.into(),
                to: to.into(),
                protocol: protocol.into(),
                ..Default::default()
            };
            let e = job_for(&req, &names).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{from} {to}: {e:?}");
        }
        // A raw frame enters on the host veth of the pod whose address is its source.
        let req = TraceRequest {
            from: "demo/client".into(),
            to: "10.96.0.10:80".into(),
            ..Default::default()
        };
        let job = job_for(&req, &names).unwrap();
        let raw = job_for(
            &TraceRequest {
                frame: job.frame.clone(),
                ..Default::default()
            },
            &names,
        )
        .unwrap();
        assert_eq!(raw.ingress, PortId(12));
    }

    #[test]
    fn flags_parse_and_print() {
        assert_eq!(parse_flags("").unwrap(), tcp::flags::SYN);
        assert_eq!(
            parse_flags("syn,ack").unwrap(),
            tcp::flags::SYN | tcp::flags::ACK
        );
        assert_eq!(flags_name(tcp::flags::SYN | tcp::flags::ACK), "SYN,ACK");
        assert_eq!(
            parse_flags("SYN,BOGUS").unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
