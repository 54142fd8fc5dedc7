use super::*;
use crate::demo::{self, FrameSpec, UPLINK, host_mac, pod_mac};
use crate::frame::Frame;
use crate::parse::{self, ParseOutcome};
use crate::pipeline::{WorkerConfig, WorkerState, process};
use crate::tables::{Backend, ServiceSpec};
use crate::verdict::Verdict;
use crate::wire::ethernet::Mac;
use proptest::prelude::*;
use std::net::Ipv4Addr;

const HEADROOM: usize = 128;
const UNDERLAY: [u8; 4] = [192, 168, 50, 1];
const PEER_UNDERLAY: [u8; 4] = [192, 168, 50, 2];

fn run(t: &Tables, s: &mut WorkerState, port: PortId, bytes: &[u8]) -> (Verdict, Vec<u8>) {
    let mut buf = vec![0u8; HEADROOM + bytes.len()];
    buf[HEADROOM..].copy_from_slice(bytes);
    let mut f = Frame::new(&mut buf, HEADROOM, bytes.len());
    let v = process(t, s, 1_000, port, &mut f);
    (v, f.head().to_vec())
}

fn tuple(t: &Tables, f: &[u8]) -> FlowKey {
    let mut b = f.to_vec();
    let n = b.len();
    match parse::parse(t, &Frame::new(&mut b, 0, n)) {
        ParseOutcome::Ipv4(p) => p.key(),
        o => panic!("{o:?}"),
    }
}

/// A frame of the remote node as it arrives on our uplink.
fn from_remote(inner: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 64 + inner.len()];
    buf[64..].copy_from_slice(inner);
    let mut f = Frame::new(&mut buf, 64, inner.len());
    let tun = crate::vxlan::Tunnel {
        src_mac: demo::PEER_MAC,
        dst_mac: demo::NODE_MAC,
        src_ip: PEER_UNDERLAY,
        dst_ip: UNDERLAY,
        vni: 1,
        dst_port: 8472,
    };
    crate::vxlan::encap(&mut f, &tun, 40000, 1).unwrap();
    f.head().to_vec()
}

/// The inner frame of what the pipeline sent to the uplink (or the frame itself if not VXLAN).
fn inner(out: &[u8]) -> Vec<u8> {
    let mut b = out.to_vec();
    let n = b.len();
    let mut f = Frame::new(&mut b, 0, n);
    if crate::vxlan::is_vxlan_to(out, PEER_UNDERLAY, 8472) {
        crate::vxlan::decap(&mut f, 1).unwrap();
    }
    f.head().to_vec()
}

fn frame(spec: &FrameSpec, proto_: u8, syn_ack: bool) -> Vec<u8> {
    match proto_ {
        proto::TCP => demo::tcp_frame(spec, if syn_ack { 0x12 } else { 0x02 }, b"x"),
        _ => demo::udp_frame(spec, b"x"),
    }
}

/// `t` sent by its source, as it reaches this node: (ingress port, frame).
fn arriving(t: &FlowKey, syn_ack: bool) -> (PortId, Vec<u8>) {
    match t.src {
        [10, 244, 1, n @ 2..=3] => {
            let spec = FrameSpec::from_pod(n, t.dst, t.src_port, t.dst_port);
            (PortId(u32::from(n) - 1), frame(&spec, t.proto, syn_ack))
        }
        [10, 244, 2, _] => {
            let spec = FrameSpec {
                src_mac: demo::PEER_VTEP_MAC,
                dst_mac: demo::VTEP_MAC,
                src: t.src,
                dst: t.dst,
                src_port: t.src_port,
                dst_port: t.dst_port,
            };
            (UPLINK, from_remote(&frame(&spec, t.proto, syn_ack)))
        }
        _ => {
            let spec = FrameSpec {
                src_mac: Mac([2, 0, 0, 0, 0, 9]),
                dst_mac: demo::NODE_MAC,
                src: t.src,
                dst: t.dst,
                src_port: t.src_port,
                dst_port: t.dst_port,
            };
            (UPLINK, frame(&spec, t.proto, syn_ack))
        }
    }
}

/// Endpoints a random flow may use.
const PODS: [[u8; 4]; 4] = [
    [10, 244, 1, 2],
    [10, 244, 1, 3],
    [10, 244, 2, 3],
    [10, 244, 2, 4],
];

#[derive(Clone, Debug)]
struct Svc {
    port: u16,
    udp: bool,
    node_port: bool,
    affinity: bool,
    backends: Vec<(usize, u16)>,
}

/// Ports: any, or one of a few that backends serve (so clients sometimes use a port their own pod
/// serves as a backend, the corner case of rule 3).
fn port() -> impl Strategy<Value = u16> {
    prop_oneof![1u16..65535, prop::sample::select(vec![80u16, 5201, 8080])]
}

fn svc() -> impl Strategy<Value = Svc> {
    (
        1u16..2000,
        any::<bool>(),
        any::<bool>(),
        prop::bool::weighted(0.2),
        prop::collection::vec((0usize..4, port()), 1..5),
    )
        .prop_map(|(port, udp, node_port, affinity, backends)| Svc {
            port,
            udp,
            node_port,
            affinity,
            backends,
        })
}

fn tables(svcs: &[Svc]) -> Tables {
    let mut b = demo::demo_builder().maglev_size(251);
    for (i, s) in svcs.iter().enumerate() {
        b = b.service(ServiceSpec {
            name: format!("t/s{i}"),
            cluster_ip: Ipv4Addr::new(10, 96, 1, i as u8),
            port: s.port,
            proto: if s.udp { proto::UDP } else { proto::TCP },
            node_port: s.node_port.then_some(31000 + i as u16),
            backends: s
                .backends
                .iter()
                .map(|(p, port)| Backend {
                    ip: Ipv4Addr::from(PODS[*p]),
                    port: *port,
                    weight: 1,
                })
                .collect(),
            affinity_timeout_s: s.affinity.then_some(10),
        });
    }
    b.build().unwrap()
}

/// A flow's first packet: (kind, client, service or peer index, ports).
#[derive(Clone, Debug)]
struct Flow {
    kind: u8,
    client: usize,
    target: usize,
    sport: u16,
    dport: u16,
    udp: bool,
}

fn flow() -> impl Strategy<Value = Flow> {
    (0u8..3, 0usize..4, 0usize..8, port(), port(), any::<bool>()).prop_map(
        |(kind, client, target, sport, dport, udp)| Flow {
            kind,
            client,
            target,
            sport,
            dport,
            udp,
        },
    )
}

/// The first packet's tuple: 0 = a pod to a ClusterIP, 1 = pod to pod, 2 = an outside client to a
/// NodePort. `None` when the tables have no such target.
fn first_tuple(svcs: &[Svc], f: &Flow) -> Option<FlowKey> {
    let client = PODS[f.client];
    match f.kind {
        0 => {
            let i = f.target % svcs.len();
            let s = &svcs[i];
            Some(FlowKey {
                src: client,
                dst: [10, 96, 1, i as u8],
                src_port: f.sport,
                dst_port: s.port,
                proto: if s.udp { proto::UDP } else { proto::TCP },
            })
        }
        1 => {
            let peer = PODS[f.target % 4];
            // One end must be on this node for the frame to come here at all.
            (peer != client && (client[2] == 1 || peer[2] == 1)).then_some(FlowKey {
                src: client,
                dst: peer,
                src_port: f.sport,
                dst_port: f.dport,
                proto: if f.udp { proto::UDP } else { proto::TCP },
            })
        }
        _ => {
            let i = (0..svcs.len())
                .map(|k| (f.target + k) % svcs.len())
                .find(|&k| svcs[k].node_port)?;
            Some(FlowKey {
                src: [172, 16, (f.sport >> 8) as u8, f.sport as u8],
                dst: UNDERLAY,
                src_port: f.sport,
                dst_port: 31000 + i as u16,
                proto: if svcs[i].udp { proto::UDP } else { proto::TCP },
            })
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// For random service tables and flows: the owner of a flow's first packet, having processed
    /// it (DNAT to the Maglev backend, NodePort SNAT from its port share), is also the owner of
    /// the reply as it comes back and of an ICMP error about the translated packet; and that
    /// worker's conntrack knows the reply (it is reverse-translated to the original client).
    #[test]
    fn a_flow_and_its_reply_have_the_same_owner(
        svcs in prop::collection::vec(svc(), 1..5),
        f in flow(),
        workers in 2usize..9,
    ) {
        let t = tables(&svcs);
        let Some(first) = first_tuple(&svcs, &f) else { return Ok(()) };
        // A pod on the remote node only reaches this node's pods or VIPs through VXLAN.
        let (port, bytes) = arriving(&first, false);
        let owner1 = owner(&t, &bytes, port, workers).unwrap();
        prop_assert!(owner1 < workers);
        let mut s = WorkerState::new(WorkerConfig::default());
        s.steer = Steer { worker: owner1 as u16, workers: workers as u16 };
        let (v, out) = run(&t, &mut s, port, &bytes);
        let Verdict::Forward(_) = v else {
            // Not forwarded (e.g. a remote pod to a remote pod is not ours): nothing to reply to.
            return Ok(());
        };
        let sent = tuple(&t, &inner(&out));
        let reply = sent.reversed();
        let (rport, rbytes) = arriving(&reply, true);
        prop_assert_eq!(owner(&t, &rbytes, rport, workers), Some(owner1), "reply {:?}", reply);

        // An ICMP error from the far end about the packet it received.
        let spec = FrameSpec {
            src_mac: pod_mac(9),
            dst_mac: host_mac(9),
            src: reply.src,
            dst: reply.dst,
            src_port: 0,
            dst_port: 0,
        };
        let about = inner(&out);
        let err = demo::icmp_error_frame(&spec, 3, 3, &about);
        let (eport, ebytes) = match reply.src {
            [10, 244, 1, n] => (PortId(u32::from(n) - 1), err),
            _ => (UPLINK, from_remote(&err)),
        };
        prop_assert_eq!(owner(&t, &ebytes, eport, workers), Some(owner1), "ICMP error");

        let (rv, rout) = run(&t, &mut s, rport, &rbytes);
        prop_assert!(matches!(rv, Verdict::Forward(_)), "reply verdict {:?}", rv);
        let back = tuple(&t, &inner(&rout));
        prop_assert_eq!(back, first.reversed(), "reply not translated back");
    }

    /// A client's packets to a ClusterIP keep their owner when the service's backends change
    /// (rule 2 does not depend on Maglev's choice), unless the client is a backend endpoint.
    #[test]
    fn owners_survive_backend_changes(
        svcs in prop::collection::vec(svc(), 1..5),
        new_backends in prop::collection::vec(prop::collection::vec((0usize..4, port()), 1..5), 4),
        f in flow(),
        workers in 2usize..9,
    ) {
        let f = Flow { kind: 0, ..f };
        let t1 = tables(&svcs);
        let changed: Vec<Svc> = svcs
            .iter()
            .zip(&new_backends)
            .map(|(s, b)| Svc { backends: b.clone(), ..s.clone() })
            .collect();
        let t2 = tables(&changed);
        let Some(first) = first_tuple(&svcs, &f) else { return Ok(()) };
        if t1.is_backend(first.src, first.src_port, first.proto)
            || t2.is_backend(first.src, first.src_port, first.proto)
        {
            return Ok(());
        }
        let (port, bytes) = arriving(&first, false);
        prop_assert_eq!(owner(&t1, &bytes, port, workers), owner(&t2, &bytes, port, workers));
    }

    /// Headers the owner cannot read never panic and give no owner or a worker in range.
    #[test]
    fn any_bytes_give_a_worker_in_range(bytes in prop::collection::vec(any::<u8>(), 0..200),
                                        uplink in any::<bool>(), workers in 1usize..9) {
        let t = demo::demo_tables();
        let port = if uplink { UPLINK } else { PortId(1) };
        if let Some(w) = owner(&t, &bytes, port, workers) {
            prop_assert!(w < workers);
        }
    }
}

#[test]
fn snat_ports_come_from_the_workers_share() {
    for workers in 1..6u16 {
        for worker in 0..workers {
            let s = Steer { worker, workers };
            for port in [0u16, 1, 1023, 1024, 40000, 65534, 65535] {
                let p = s.snat_port(port);
                assert_eq!(port_owner(p, usize::from(workers)), usize::from(worker));
                assert!(p.abs_diff(port) < workers, "{port} -> {p}");
            }
        }
    }
    assert_eq!(
        Steer::default().snat_port(4321),
        4321,
        "one worker: unchanged"
    );
}

#[test]
fn one_worker_reads_nothing() {
    let t = demo::demo_tables();
    assert_eq!(owner(&t, &[], UPLINK, 1), Some(0));
    assert_eq!(owner(&t, &[], UPLINK, 2), None);
    let arp = [0u8; 60];
    assert_eq!(owner(&t, &arp, PortId(1), 4), None);
}

#[test]
fn both_directions_between_pods_agree_and_flows_spread() {
    let t = demo::demo_tables();
    let mut seen = [0usize; 4];
    for sport in 30000..30400u16 {
        let a = FrameSpec::from_pod(2, [10, 244, 1, 3], sport, 5201);
        let b = FrameSpec::from_pod(3, [10, 244, 1, 2], 5201, sport);
        let wa = owner(&t, &demo::tcp_frame(&a, 0x02, b""), PortId(1), 4).unwrap();
        let wb = owner(&t, &demo::tcp_frame(&b, 0x12, b""), PortId(2), 4).unwrap();
        assert_eq!(wa, wb);
        seen[wa] += 1;
    }
    assert!(seen.iter().all(|n| *n > 50), "{seen:?}");
}
