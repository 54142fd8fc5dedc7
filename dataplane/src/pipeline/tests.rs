use super::*;
use crate::checksum;
use crate::demo::{self, FrameSpec, UPLINK, demo_tables, host_mac, pod_mac};
use crate::events::{EventKind, FlowEvent};
use crate::wire::{icmp, ipv4, tcp};
use proptest::prelude::*;

const HEADROOM: usize = 128;
const POD_A: PortId = PortId(1);
const POD_B: PortId = PortId(2);
const VIP: [u8; 4] = [10, 96, 0, 10];
const A: [u8; 4] = [10, 244, 1, 2];
const B: [u8; 4] = [10, 244, 1, 3];
const R: [u8; 4] = [10, 244, 2, 3];

fn state() -> WorkerState {
    WorkerState::new(WorkerConfig {
        conntrack: CtConfig::with_capacity(1024),
        affinity_capacity: 64,
    })
}

/// Run one frame; return the verdict and the bytes of the frame afterwards.
fn run(
    t: &Tables,
    s: &mut WorkerState,
    now: u64,
    port: PortId,
    bytes: &[u8],
) -> (Verdict, Vec<u8>) {
    let mut buf = vec![0u8; HEADROOM + bytes.len()];
    buf[HEADROOM..].copy_from_slice(bytes);
    let mut f = Frame::new(&mut buf, HEADROOM, bytes.len());
    let v = process(t, s, now, port, &mut f);
    (v, f.head().to_vec())
}

/// IPv4 header and L4 checksums of an Ethernet frame are all correct.
fn checksums_ok(f: &[u8]) -> bool {
    let ip = ipv4::Packet::new_checked(&f[14..]).unwrap();
    if !ip.verify_checksum() {
        return false;
    }
    let hl = ip.header_len();
    let l4 = &f[14 + hl..14 + usize::from(ip.total_len())];
    let mut c = checksum::Checksum::new();
    if ip.protocol() != proto::ICMP {
        c.add_u32(checksum::pseudo_header_sum(
            ip.src(),
            ip.dst(),
            ip.protocol(),
            l4.len() as u16,
        ));
    }
    c.add_bytes(l4);
    c.fold() == 0xffff
}

fn tuple(f: &[u8]) -> FlowKey {
    let t = demo_tables();
    let n = f.len();
    let mut b = f.to_vec();
    match parse::parse(&t, &Frame::new(&mut b, 0, n)) {
        ParseOutcome::Ipv4(p) => p.key(),
        o => panic!("{o:?}"),
    }
}

/// A frame of the remote node as it arrives on our uplink: inner from `src` with VTEP MACs.
fn from_remote(inner: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 64 + inner.len()];
    buf[64..].copy_from_slice(inner);
    buf[64..70].copy_from_slice(&demo::VTEP_MAC.0);
    buf[70..76].copy_from_slice(&demo::PEER_VTEP_MAC.0);
    let mut f = Frame::new(&mut buf, 64, inner.len());
    let tun = vxlan::Tunnel {
        src_mac: demo::PEER_MAC,
        dst_mac: demo::NODE_MAC,
        src_ip: [192, 168, 50, 2],
        dst_ip: [192, 168, 50, 1],
        vni: 1,
        dst_port: 8472,
    };
    vxlan::encap(&mut f, &tun, 40000, 1).unwrap();
    f.head().to_vec()
}

fn decapped(out: &[u8]) -> Vec<u8> {
    let mut b = out.to_vec();
    let n = b.len();
    let mut f = Frame::new(&mut b, 0, n);
    vxlan::decap(&mut f, 1).unwrap();
    f.head().to_vec()
}

/// A source port of pod A whose flow to the web VIP Maglev sends to backend `ip`.
fn sport_for(t: &Tables, ip: [u8; 4]) -> u16 {
    (10000..20000)
        .find(|&sp| {
            let p = Parsed {
                l4_off: 34,
                l4_len: 20,
                ip_len: 40,
                proto: 6,
                src: A,
                dst: VIP,
                src_port: sp,
                dst_port: 80,
                tcp_flags: 0,
                icmp: IcmpKind::None,
                ttl: 64,
                dont_frag: true,
                src_mac: pod_mac(2),
                csum_partial: false,
            };
            matches!(service::select(t, &mut AffinityTable::new(1), 0, &p, false),
                ServiceOutcome::Backend { ip: b, .. } if b == ip)
        })
        .unwrap()
}

#[test]
fn cluster_ip_to_local_backend_and_reply() {
    let t = demo_tables();
    let mut s = state();
    let sp = sport_for(&t, B);
    let syn = demo::tcp_frame(&FrameSpec::from_pod(2, VIP, sp, 80), tcp::flags::SYN, b"");
    let (v, out) = run(&t, &mut s, 1, POD_A, &syn);
    assert_eq!(v, Verdict::Forward(POD_B));
    assert_eq!(
        tuple(&out),
        FlowKey {
            src: A,
            dst: B,
            src_port: sp,
            dst_port: 8080,
            proto: 6
        }
    );
    assert_eq!(
        (&out[..6], &out[6..12]),
        (&pod_mac(3).0[..], &host_mac(3).0[..])
    );
    assert_eq!(out[14 + 8], 63, "TTL decremented");
    assert!(checksums_ok(&out));
    // The backend answers; the reply is reverse-NATed to come from the VIP.
    let synack = demo::tcp_frame(
        &FrameSpec::from_pod(3, A, 8080, sp),
        tcp::flags::SYN | tcp::flags::ACK,
        b"",
    );
    let (v, out) = run(&t, &mut s, 2, POD_B, &synack);
    assert_eq!(v, Verdict::Forward(POD_A));
    assert_eq!(
        tuple(&out),
        FlowKey {
            src: VIP,
            dst: A,
            src_port: 80,
            dst_port: sp,
            proto: 6
        }
    );
    assert!(checksums_ok(&out));
    // Established: the next packet keeps its backend.
    let ack = demo::tcp_frame(
        &FrameSpec::from_pod(2, VIP, sp, 80),
        tcp::flags::ACK,
        b"hello",
    );
    let (v, out) = run(&t, &mut s, 3, POD_A, &ack);
    assert_eq!(v, Verdict::Forward(POD_B));
    assert_eq!(tuple(&out).dst, B);
    assert_eq!(s.counters.tx, 3);
    assert_eq!(s.conntrack.len(), 1);
}

/// A client that uses one source port towards a backend both directly and through a Service (a
/// kernel picks ephemeral ports per destination, so it does) opens two connections whose
/// translated tuples are the same. In either order both work: the second takes another source
/// port towards the backend (Linux NAT's clash resolution), and each reply reaches the client as
/// the connection it opened. Before, the second SYN was dropped as `conntrack_invalid` (the churn
/// soak's allowed connects that timed out).
#[test]
fn same_source_port_directly_and_through_a_service_both_connect() {
    use tcp::flags::{ACK, SYN};
    let t = demo_tables();
    let sp = sport_for(&t, B);
    let direct = FrameSpec::from_pod(2, B, sp, 8080);
    let vip = FrameSpec::from_pod(2, VIP, sp, 80);
    for order in [[direct, vip], [vip, direct]] {
        let mut s = state();
        let mut seen = Vec::new();
        for (i, spec) in order.iter().enumerate() {
            let syn = demo::tcp_frame(spec, SYN, b"");
            let (v, out) = run(&t, &mut s, 1 + i as u64, POD_A, &syn);
            assert_eq!(v, Verdict::Forward(POD_B), "SYN {i} of {order:?}");
            assert!(checksums_ok(&out));
            let k = tuple(&out);
            assert_eq!((k.src, k.dst, k.dst_port), (A, B, 8080));
            seen.push(k.src_port);
        }
        assert_eq!(seen[0], sp, "the first keeps its port");
        assert_ne!(seen[1], sp, "the second takes another");
        for (i, spec) in order.iter().enumerate() {
            let synack = demo::tcp_frame(&FrameSpec::from_pod(3, A, 8080, seen[i]), SYN | ACK, b"");
            let (v, out) = run(&t, &mut s, 10, POD_B, &synack);
            assert_eq!(v, Verdict::Forward(POD_A), "SYN/ACK {i} of {order:?}");
            assert!(checksums_ok(&out));
            let k = tuple(&out);
            assert_eq!(
                (k.src, k.src_port, k.dst, k.dst_port),
                (spec.dst, spec.dst_port, A, sp)
            );
        }
        assert_eq!(s.conntrack.len(), 2);
    }
}

#[test]
fn cluster_ip_to_remote_backend_encaps_and_reply_is_decapped() {
    let t = demo_tables();
    let mut s = state();
    let sp = sport_for(&t, R);
    let syn = demo::tcp_frame(&FrameSpec::from_pod(2, VIP, sp, 80), tcp::flags::SYN, b"");
    let (v, out) = run(&t, &mut s, 1, POD_A, &syn);
    assert_eq!(v, Verdict::Forward(UPLINK));
    assert_eq!(out.len(), syn.len() + vxlan::OVERHEAD);
    assert!(vxlan::is_vxlan_to(&out, [192, 168, 50, 2], 8472));
    let sport = u16::from_be_bytes([out[34], out[35]]);
    assert!((vxlan::SRC_PORT_MIN..=vxlan::SRC_PORT_MAX).contains(&sport));
    let inner = decapped(&out);
    assert_eq!(
        (&inner[..6], &inner[6..12]),
        (&demo::PEER_VTEP_MAC.0[..], &demo::VTEP_MAC.0[..])
    );
    assert_eq!(
        tuple(&inner),
        FlowKey {
            src: A,
            dst: R,
            src_port: sp,
            dst_port: 8080,
            proto: 6
        }
    );
    assert!(checksums_ok(&inner));
    // The reply comes back over VXLAN from node 2.
    let synack = demo::tcp_frame(
        &FrameSpec {
            src_mac: Mac([0; 6]),
            dst_mac: Mac([0; 6]),
            src: R,
            dst: A,
            src_port: 8080,
            dst_port: sp,
        },
        tcp::flags::SYN | tcp::flags::ACK,
        b"",
    );
    let (v, out) = run(&t, &mut s, 2, UPLINK, &from_remote(&synack));
    assert_eq!(v, Verdict::Forward(POD_A));
    assert_eq!(
        tuple(&out),
        FlowKey {
            src: VIP,
            dst: A,
            src_port: 80,
            dst_port: sp,
            proto: 6
        }
    );
    assert_eq!(&out[..6], &pod_mac(2).0);
    assert!(checksums_ok(&out));
}

#[test]
fn pod_to_pod_across_nodes_and_udp_icmp() {
    let t = demo_tables();
    let mut s = state();
    let udp = demo::udp_frame(&FrameSpec::from_pod(2, R, 5000, 6000), b"sluice");
    let (v, out) = run(&t, &mut s, 1, POD_A, &udp);
    assert_eq!(v, Verdict::Forward(UPLINK));
    let inner = decapped(&out);
    assert_eq!(tuple(&inner), tuple(&udp));
    assert!(checksums_ok(&inner));
    let ping = demo::icmp_echo_frame(&FrameSpec::from_pod(2, B, 77, 77), false, 1);
    let (v, out) = run(&t, &mut s, 1, POD_A, &ping);
    assert_eq!(v, Verdict::Forward(POD_B));
    assert!(checksums_ok(&out));
    let pong = demo::icmp_echo_frame(&FrameSpec::from_pod(3, A, 77, 77), true, 1);
    let (v, _) = run(&t, &mut s, 2, POD_B, &pong);
    assert_eq!(v, Verdict::Forward(POD_A));
    assert_eq!(s.conntrack.len(), 2);
}

#[test]
fn drops_with_reasons() {
    let t = demo_tables();
    let mut s = state();
    let spec = FrameSpec::from_pod(2, [10, 244, 7, 1], 1, 80);
    let (v, _) = run(
        &t,
        &mut s,
        1,
        POD_A,
        &demo::tcp_frame(&spec, tcp::flags::SYN, b""),
    );
    assert_eq!(v, Verdict::Drop(DropReason::NoRoute));
    let spec = FrameSpec::from_pod(2, [10, 96, 0, 99], 1, 80);
    let (v, _) = run(
        &t,
        &mut s,
        1,
        POD_A,
        &demo::tcp_frame(&spec, tcp::flags::SYN, b""),
    );
    assert_eq!(v, Verdict::Drop(DropReason::NoBackend));
    let spec = FrameSpec::from_pod(2, B, 1, 80);
    let (v, _) = run(
        &t,
        &mut s,
        1,
        POD_B,
        &demo::tcp_frame(&spec, tcp::flags::SYN, b""),
    );
    assert_eq!(v, Verdict::Drop(DropReason::SpoofedSource));
    let mut f = demo::tcp_frame(&FrameSpec::from_pod(2, B, 2, 80), tcp::flags::SYN, b"");
    f[14 + 8] = 1;
    ipv4::Packet::new_checked(&mut f[14..])
        .unwrap()
        .fill_checksum();
    let (v, _) = run(&t, &mut s, 1, POD_A, &f);
    assert_eq!(v, Verdict::Drop(DropReason::TtlExceeded));
    // Larger than VXLAN carries, DF set, not TCP: answered with fragmentation-needed.
    let big = demo::udp_frame(&FrameSpec::from_pod(2, R, 1, 2), &[0u8; 1500]);
    let (v, _) = run(&t, &mut s, 1, POD_A, &big);
    assert_eq!(v, Verdict::FragNeeded(1450));
    // A TCP packet with invalid flags for a new flow.
    let f = demo::tcp_frame(
        &FrameSpec::from_pod(2, B, 3, 80),
        tcp::flags::SYN | tcp::flags::FIN,
        b"",
    );
    let (v, _) = run(&t, &mut s, 1, POD_A, &f);
    assert_eq!(v, Verdict::Drop(DropReason::ConntrackInvalid));
    let (v, _) = run(&t, &mut s, 1, POD_A, &[0u8; 5]);
    assert_eq!(v, Verdict::Drop(DropReason::Truncated));
    assert_eq!(s.counters.rx, 7);
    assert_eq!(s.counters.drops.iter().sum::<u64>(), 7);
    assert_eq!(s.counters.dropped(DropReason::NoRoute), 1);
    assert_eq!(s.counters.dropped(DropReason::FragmentationNeeded), 1);
}

/// Pods send up to the large pod MTU on cluster routes. Towards another node, a frame larger than
/// VXLAN carries is rewritten for its route (NAT, TTL, VTEP MACs) but left for the transmitter
/// to cut and encapsulate: TCP whatever its DF, other protocols when DF is clear. With DF set,
/// a UDP datagram is answered with fragmentation-needed before NAT (the frame is as it came).
#[test]
fn oversized_frames_to_other_nodes_are_segmented_or_answered() {
    let t = demo_tables();
    let mut s = state();
    // TCP through the ClusterIP to the remote backend: established first, then a 9000-byte segment.
    let sp = sport_for(&t, R);
    let syn = demo::tcp_frame(&FrameSpec::from_pod(2, VIP, sp, 80), tcp::flags::SYN, b"");
    assert_eq!(run(&t, &mut s, 1, POD_A, &syn).0, Verdict::Forward(UPLINK));
    let synack = FrameSpec {
        src_mac: Mac([0; 6]),
        dst_mac: Mac([0; 6]),
        src: R,
        dst: A,
        src_port: 8080,
        dst_port: sp,
    };
    let synack = demo::tcp_frame(&synack, tcp::flags::SYN | tcp::flags::ACK, b"");
    assert_eq!(
        run(&t, &mut s, 1, UPLINK, &from_remote(&synack)).0,
        Verdict::Forward(POD_A)
    );
    let data = demo::tcp_frame(
        &FrameSpec::from_pod(2, VIP, sp, 80),
        tcp::flags::ACK,
        &[7u8; 9000],
    );
    let (v, out) = run(&t, &mut s, 2, POD_A, &data);
    assert_eq!(v, Verdict::Segment(UPLINK));
    assert_eq!(out.len(), data.len(), "not encapsulated");
    assert_eq!(tuple(&out).dst, R, "DNATed to the backend");
    assert_eq!(
        (&out[..6], &out[6..12]),
        (&demo::PEER_VTEP_MAC.0[..], &demo::VTEP_MAC.0[..])
    );
    assert_eq!(out[14 + 8], 63, "TTL decremented");
    assert!(checksums_ok(&out));
    let tun = route::tunnel_to(&t, R).expect("a tunnel to the backend's node");
    assert_eq!(tun.dst_ip, [192, 168, 50, 2]);
    // UDP with DF clear: fragmented by the transmitter.
    let mut udp = demo::udp_frame(&FrameSpec::from_pod(2, R, 5, 6), &[1u8; 3000]);
    udp[14 + 6] &= !0x40;
    ipv4::Packet::new_checked(&mut udp[14..])
        .unwrap()
        .fill_checksum();
    assert_eq!(run(&t, &mut s, 3, POD_A, &udp).0, Verdict::Segment(UPLINK));
    // UDP with DF set to the web VIP's remote backend is answered, NAT not applied.
    let dns = demo::udp_frame(
        &FrameSpec::from_pod(2, [10, 96, 0, 53], 4444, 53),
        &[2u8; 3000],
    );
    let (v, out) = run(&t, &mut s, 4, POD_A, &dns);
    assert_eq!(v, Verdict::FragNeeded(1450));
    assert_eq!(out, dns, "left as it came");
    // To a local pod the large MTU is fine.
    let local = demo::tcp_frame(&FrameSpec::from_pod(2, B, 9, 80), tcp::flags::SYN, b"");
    assert_eq!(run(&t, &mut s, 5, POD_A, &local).0, Verdict::Forward(POD_B));
    let local = demo::udp_frame(&FrameSpec::from_pod(2, B, 9, 81), &[3u8; 9000]);
    assert_eq!(run(&t, &mut s, 6, POD_A, &local).0, Verdict::Forward(POD_B));
    assert_eq!(
        s.counters.tx, 6,
        "a segmented frame counts as one forwarded"
    );
    assert_eq!(s.counters.dropped(DropReason::FragmentationNeeded), 1);
}

#[test]
fn uplink_traffic_not_ours_goes_to_kernel() {
    let t = demo_tables();
    let mut s = state();
    let spec = FrameSpec {
        src_mac: Mac([9; 6]),
        dst_mac: demo::NODE_MAC,
        src: [203, 0, 113, 5],
        dst: [192, 168, 50, 1],
        src_port: 5555,
        dst_port: 22,
    };
    let (v, _) = run(
        &t,
        &mut s,
        1,
        UPLINK,
        &demo::tcp_frame(&spec, tcp::flags::SYN, b""),
    );
    assert_eq!(v, Verdict::PassToKernel);
    let mut arp = vec![0u8; 42];
    arp[12..14].copy_from_slice(&[8, 6]);
    assert_eq!(run(&t, &mut s, 1, UPLINK, &arp).0, Verdict::PassToKernel);
    assert_eq!(s.counters.passed, 2);
}

#[test]
fn node_port_snat_and_reply_to_client_mac() {
    let t = demo_tables();
    let mut s = state();
    let client = [203, 0, 113, 5];
    let cmac = [9, 9, 9, 9, 9, 9];
    // Find a client port whose flow goes to the local backend.
    let (sp, out) = (1000u16..3000)
        .find_map(|sp| {
            let spec = FrameSpec {
                src_mac: Mac(cmac),
                dst_mac: demo::NODE_MAC,
                src: client,
                dst: [192, 168, 50, 1],
                src_port: sp,
                dst_port: 30080,
            };
            let mut s2 = state();
            let (v, out) = run(
                &t,
                &mut s2,
                1,
                UPLINK,
                &demo::tcp_frame(&spec, tcp::flags::SYN, b""),
            );
            (v == Verdict::Forward(POD_B)).then_some((sp, out))
        })
        .unwrap();
    assert_eq!(
        tuple(&out),
        FlowKey {
            src: [10, 244, 1, 0],
            dst: B,
            src_port: sp,
            dst_port: 8080,
            proto: 6
        }
    );
    assert!(checksums_ok(&out));
    let spec = FrameSpec {
        src_mac: Mac(cmac),
        dst_mac: demo::NODE_MAC,
        src: client,
        dst: [192, 168, 50, 1],
        src_port: sp,
        dst_port: 30080,
    };
    assert_eq!(
        run(
            &t,
            &mut s,
            1,
            UPLINK,
            &demo::tcp_frame(&spec, tcp::flags::SYN, b"")
        )
        .0,
        Verdict::Forward(POD_B)
    );
    let synack = demo::tcp_frame(
        &FrameSpec::from_pod(3, [10, 244, 1, 0], 8080, sp),
        tcp::flags::SYN | tcp::flags::ACK,
        b"",
    );
    let (v, out) = run(&t, &mut s, 2, POD_B, &synack);
    assert_eq!(v, Verdict::Forward(UPLINK));
    assert_eq!((&out[..6], &out[6..12]), (&cmac[..], &demo::NODE_MAC.0[..]));
    assert_eq!(
        tuple(&out),
        FlowKey {
            src: [192, 168, 50, 1],
            dst: client,
            src_port: 30080,
            dst_port: sp,
            proto: 6
        }
    );
    assert!(checksums_ok(&out));
}

#[test]
fn icmp_error_about_translated_flow_is_translated() {
    let t = demo_tables();
    let mut s = state();
    let dns = [10, 96, 0, 53];
    let q = demo::udp_frame(&FrameSpec::from_pod(2, dns, 4444, 53), b"query");
    let (v, out) = run(&t, &mut s, 1, POD_A, &q);
    assert_eq!(v, Verdict::Forward(UPLINK));
    let sent = decapped(&out);
    let backend = tuple(&sent).dst;
    // The backend's node answers "port unreachable" about the datagram it received.
    let err = demo::icmp_error_frame(
        &FrameSpec {
            src_mac: Mac([0; 6]),
            dst_mac: Mac([0; 6]),
            src: backend,
            dst: A,
            src_port: 0,
            dst_port: 0,
        },
        icmp::kind::DEST_UNREACHABLE,
        3,
        &sent,
    );
    let (v, out) = run(&t, &mut s, 2, UPLINK, &from_remote(&err));
    assert_eq!(v, Verdict::Forward(POD_A));
    let ip = ipv4::Packet::new_checked(&out[14..]).unwrap();
    assert_eq!((ip.src(), ip.dst()), (dns, A));
    assert!(checksums_ok(&out));
    let inner = &out[14 + 20 + 8..];
    let iip = ipv4::Packet::new_checked(inner).unwrap();
    assert!(iip.verify_checksum());
    assert_eq!((iip.src(), iip.dst()), (A, dns));
    assert_eq!(&inner[20..24], &[0x11, 0x5c, 0, 53]);
    // An error about nothing we track is dropped.
    let stray = demo::icmp_error_frame(
        &FrameSpec::from_pod(3, A, 0, 0),
        3,
        3,
        &demo::udp_frame(&FrameSpec::from_pod(2, B, 1, 2), b""),
    );
    assert_eq!(
        run(&t, &mut s, 3, POD_B, &stray).0,
        Verdict::Drop(DropReason::IcmpErrorUnrelated)
    );
}

#[test]
fn chained_frame_with_partial_checksum_is_completed() {
    let t = demo_tables();
    let mut s = state();
    let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
    let mut full = demo::tcp_frame(&FrameSpec::from_pod(2, B, 9, 80), tcp::flags::SYN, &payload);
    let l4_len = (full.len() - 34) as u16;
    let partial = checksum::pseudo_header_folded(A, B, 6, l4_len);
    full[34 + 16..34 + 18].copy_from_slice(&partial.to_be_bytes());
    let mut head = vec![0u8; HEADROOM + 100];
    head[HEADROOM..].copy_from_slice(&full[..100]);
    let t1 = full[100..1600].to_vec();
    let t2 = full[1600..].to_vec();
    let tail: [&[u8]; 2] = [&t1, &t2];
    let mut f = Frame::new(&mut head, HEADROOM, 100).with_tail(&tail);
    assert_eq!(
        process(&t, &mut s, 1, POD_A, &mut f),
        Verdict::Forward(POD_B)
    );
    let mut out = f.head().to_vec();
    out.extend_from_slice(&t1);
    out.extend_from_slice(&t2);
    assert!(checksums_ok(&out));
}

/// A frame whose TCP or UDP checksum is partial (its sender offloads it).
fn partial(mut f: Vec<u8>, src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let proto = f[14 + 9];
    let co = if proto == 6 { 16 } else { 6 };
    let l4_len = (f.len() - 34) as u16;
    let sum = checksum::pseudo_header_folded(src, dst, proto, l4_len);
    f[34 + co..34 + co + 2].copy_from_slice(&sum.to_be_bytes());
    f
}

/// With TX checksum offload, a partial checksum towards a local pod stays partial (after NAT,
/// the pseudo-header sum of the translated addresses) and the frame asks the transmitter to
/// complete it; without offload, or towards another node or the kernel, it is completed here.
#[test]
fn partial_checksums_are_offloaded_to_local_pods_only() {
    use crate::frame::TxChecksum;
    let t = demo_tables();
    let field = |f: &[u8]| u16::from_be_bytes([f[34 + 16], f[34 + 17]]);
    let tcp_request = Some(TxChecksum {
        start: 34,
        offset: 16,
    });
    let run_f = |s: &mut WorkerState, port, bytes: &[u8]| {
        let mut buf = vec![0u8; HEADROOM + bytes.len()];
        buf[HEADROOM..].copy_from_slice(bytes);
        let mut f = Frame::new(&mut buf, HEADROOM, bytes.len());
        let v = process(&t, s, 1, port, &mut f);
        (v, f.head().to_vec(), f.tx_checksum())
    };
    for offload in [true, false] {
        let mut s = state();
        s.tx_checksum_offload = offload;
        // Pod to pod on this node.
        let f = partial(
            demo::tcp_frame(&FrameSpec::from_pod(2, B, 7, 80), tcp::flags::SYN, b"abc"),
            A,
            B,
        );
        let (v, out, req) = run_f(&mut s, POD_A, &f);
        assert_eq!(v, Verdict::Forward(POD_B));
        if offload {
            assert_eq!(req, tcp_request);
            assert_eq!(field(&out), field(&f), "left partial");
        } else {
            assert_eq!(req, None);
            assert!(checksums_ok(&out), "completed");
        }
        // Through the ClusterIP to the local backend: NAT keeps the partial sum right.
        let sp = sport_for(&t, B);
        let f = partial(
            demo::tcp_frame(
                &FrameSpec::from_pod(2, VIP, sp, 80),
                tcp::flags::SYN,
                b"xyz",
            ),
            A,
            VIP,
        );
        let (v, out, req) = run_f(&mut s, POD_A, &f);
        assert_eq!(v, Verdict::Forward(POD_B));
        if offload {
            assert_eq!(req, tcp_request);
            let l4_len = (out.len() - 34) as u16;
            assert_eq!(
                field(&out),
                checksum::pseudo_header_folded(A, B, 6, l4_len),
                "the pseudo-header sum of the translated addresses"
            );
            // What the kernel will compute from it verifies.
            let mut done = out.clone();
            let n = done.len();
            let p = match parse::parse(&t, &Frame::new(&mut done, 0, n)) {
                ParseOutcome::Ipv4(mut p) => {
                    p.csum_partial = true;
                    p
                }
                o => panic!("{o:?}"),
            };
            assert!(checksum::complete_partial(
                &mut Frame::new(&mut done, 0, n),
                &p
            ));
            assert!(checksums_ok(&done));
        } else {
            assert!(checksums_ok(&out));
        }
        // To another node: completed inside the tunnel, never requested.
        let f = partial(
            demo::udp_frame(&FrameSpec::from_pod(2, R, 5000, 6000), b"remote"),
            A,
            R,
        );
        let (v, out, req) = run_f(&mut s, POD_A, &f);
        assert_eq!(v, Verdict::Forward(UPLINK));
        assert_eq!(req, None);
        assert!(checksums_ok(&decapped(&out)));
    }
}

#[test]
fn batch_fills_verdicts() {
    let t = demo_tables();
    let mut s = state();
    let a = demo::udp_frame(&FrameSpec::from_pod(2, B, 1, 2), b"x");
    let mut b1 = a.clone();
    let mut b2 = vec![0u8; 3];
    let mut frames = [Frame::new(&mut b1, 0, a.len()), Frame::new(&mut b2, 0, 3)];
    let mut verdicts = [Verdict::PassToKernel; 2];
    process_batch(&t, &mut s, 1, POD_A, &mut frames, &mut verdicts);
    assert_eq!(
        verdicts,
        [
            Verdict::Forward(POD_B),
            Verdict::Drop(DropReason::Truncated)
        ]
    );
}

fn shared_tables() -> &'static Tables {
    static T: std::sync::OnceLock<Tables> = std::sync::OnceLock::new();
    T.get_or_init(demo_tables)
}

fn seeds() -> Vec<Vec<u8>> {
    let mut v =
        crate::pcap::read_frames(include_bytes!("../../testdata/vxlan-kernel.pcap")).unwrap();
    v.push(demo::tcp_frame(
        &FrameSpec::from_pod(2, VIP, 1234, 80),
        tcp::flags::SYN,
        b"abc",
    ));
    v.push(demo::udp_frame(
        &FrameSpec::from_pod(2, [10, 96, 0, 53], 1, 53),
        b"q",
    ));
    v.push(demo::icmp_echo_frame(
        &FrameSpec::from_pod(2, R, 5, 5),
        false,
        1,
    ));
    v
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Arbitrary bytes on any port: no panic, one counted verdict, and garbage (not even an
    /// Ethernet header) is a drop with a reason.
    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200), port in 0u32..3) {
        let t = shared_tables();
        let mut s = state();
        let (v, _) = run(t, &mut s, 1, PortId(port), &bytes);
        prop_assert_eq!(s.counters.rx, 1);
        if bytes.len() < 14 {
            prop_assert_eq!(v, Verdict::Drop(DropReason::Truncated));
        }
    }

    /// Real frames with random bytes flipped or cut short: no panic; a forwarded frame still has
    /// valid IPv4 header checksums.
    #[test]
    fn mutated_frames_never_panic(which in 0usize..16, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
                                  cut in any::<usize>(), port in 0u32..3) {
        let seeds = seeds();
        let mut f = seeds[which % seeds.len()].clone();
        for (at, x) in flips {
            let n = f.len();
            f[at % n] ^= x;
        }
        let keep = f.len() - cut % (f.len() / 4 + 1);
        f.truncate(keep);
        let t = shared_tables();
        let mut s = state();
        let (v, out) = run(t, &mut s, 1, PortId(port), &f);
        prop_assert_eq!(s.counters.rx, 1);
        if let Verdict::Forward(_) = v {
            let ip = ipv4::Packet::new_checked(&out[14..]).unwrap();
            prop_assert!(ip.verify_checksum());
        }
    }
}

/// Frames the kernel's vxlan device sent from node 2 (192.168.50.2) to node 1 are decapsulated and
/// delivered to pod 10.244.1.2, their partial inner checksums completed.
#[test]
fn kernel_made_vxlan_frames_are_delivered() {
    let t = demo_tables();
    let mut s = state();
    let frames =
        crate::pcap::read_frames(include_bytes!("../../testdata/vxlan-kernel.pcap")).unwrap();
    let mut delivered = 0;
    for (i, f) in frames.iter().enumerate() {
        let (v, out) = run(&t, &mut s, i as u64 + 1, UPLINK, f);
        if f[30..34] == [192, 168, 50, 1] {
            let inner_icmp_error = f[50 + 23] == 1 && f[50 + 34] == 3;
            if inner_icmp_error {
                assert_eq!(
                    v,
                    Verdict::Drop(DropReason::IcmpErrorUnrelated),
                    "frame {i}"
                );
                continue;
            }
            // A SYN/ACK opening no tracked connection is invalid (as in Linux conntrack): the SYN
            // went out through node 1's kernel, not through this pipeline.
            if f[50 + 23] == 6 && f[50 + 34 + 13] == tcp::flags::SYN | tcp::flags::ACK {
                assert_eq!(v, Verdict::Drop(DropReason::ConntrackInvalid), "frame {i}");
                continue;
            }
            assert_eq!(v, Verdict::Forward(POD_A), "frame {i}");
            assert_eq!(&out[..6], &pod_mac(2).0);
            assert!(checksums_ok(&out), "frame {i}");
            delivered += 1;
        } else {
            // Node 1's own outgoing VXLAN is not addressed to it.
            assert_eq!(v, Verdict::PassToKernel, "frame {i}");
        }
    }
    assert!(delivered >= 4, "{delivered}");
}

#[test]
fn tables_can_be_shared_and_state_moved_to_a_worker() {
    fn shared<T: Send + Sync + 'static>() {}
    fn sent<T: Send + 'static>() {}
    shared::<Tables>();
    sent::<WorkerState>();
    // A snapshot published through arc-swap, as the agent does.
    let cell = arc_swap::ArcSwap::from_pointee(demo_tables());
    cell.store(std::sync::Arc::new(demo_tables()));
    assert_eq!(cell.load().service_count(), 3);
}

/// A new snapshot with a changed backend set does not move established flows.
#[test]
fn established_flows_keep_their_backend_across_snapshots() {
    use crate::tables::{Backend, LocalPod, ServiceSpec, TablesBuilder};
    use std::net::Ipv4Addr;
    let t1 = demo_tables();
    let mut s = state();
    let sp = sport_for(&t1, R);
    let syn = demo::tcp_frame(&FrameSpec::from_pod(2, VIP, sp, 80), tcp::flags::SYN, b"");
    assert_eq!(run(&t1, &mut s, 1, POD_A, &syn).0, Verdict::Forward(UPLINK));
    let spec = FrameSpec {
        src_mac: Mac([0; 6]),
        dst_mac: Mac([0; 6]),
        src: R,
        dst: A,
        src_port: 8080,
        dst_port: sp,
    };
    let synack = demo::tcp_frame(&spec, tcp::flags::SYN | tcp::flags::ACK, b"");
    assert_eq!(
        run(&t1, &mut s, 2, UPLINK, &from_remote(&synack)).0,
        Verdict::Forward(POD_A)
    );
    // The next snapshot: web's remote backend is gone, a new local one came.
    let pod = |n| LocalPod {
        port: PortId(u32::from(n) - 1),
        pod_mac: pod_mac(n),
        host_mac: host_mac(n),
    };
    let t2 = TablesBuilder::new(t1.node.clone())
        .pod(Ipv4Addr::new(10, 244, 1, 2), pod(2))
        .pod(Ipv4Addr::new(10, 244, 1, 3), pod(3))
        .remote_node(*t1.remote_node(R).unwrap())
        .service(ServiceSpec {
            name: "default/web:80".into(),
            cluster_ip: Ipv4Addr::from(VIP),
            port: 80,
            proto: 6,
            node_port: None,
            backends: vec![Backend {
                ip: Ipv4Addr::from(B),
                port: 8080,
                weight: 1,
            }],
            affinity_timeout_s: None,
        })
        .build()
        .unwrap();
    let ack = demo::tcp_frame(&FrameSpec::from_pod(2, VIP, sp, 80), tcp::flags::ACK, b"x");
    let (v, out) = run(&t2, &mut s, 3, POD_A, &ack);
    assert_eq!(v, Verdict::Forward(UPLINK));
    assert_eq!(tuple(&decapped(&out)).dst, R);
    // A new flow goes to the new backend set.
    let syn = demo::tcp_frame(
        &FrameSpec::from_pod(2, VIP, sp + 1, 80),
        tcp::flags::SYN,
        b"",
    );
    assert_eq!(run(&t2, &mut s, 4, POD_A, &syn).0, Verdict::Forward(POD_B));
}

fn flow_pool() -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    for sp in [1000u16, 1001, 1002, 1003] {
        v.push(demo::tcp_frame(
            &FrameSpec::from_pod(2, VIP, sp, 80),
            tcp::flags::SYN,
            b"",
        ));
        v.push(demo::tcp_frame(
            &FrameSpec::from_pod(2, VIP, sp, 80),
            tcp::flags::ACK,
            b"data",
        ));
        let spec = FrameSpec {
            src_mac: Mac([0; 6]),
            dst_mac: Mac([0; 6]),
            src: R,
            dst: A,
            src_port: 8080,
            dst_port: sp,
        };
        v.push(from_remote(&demo::tcp_frame(
            &spec,
            tcp::flags::SYN | tcp::flags::ACK,
            b"",
        )));
        v.push(demo::udp_frame(
            &FrameSpec::from_pod(2, [10, 96, 0, 53], sp, 53),
            b"q",
        ));
        v.push(demo::icmp_echo_frame(
            &FrameSpec::from_pod(2, R, sp, sp),
            false,
            1,
        ));
    }
    v.push(vec![0u8; 20]);
    v
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// `process_batch` gives the same verdicts and bytes as `process` frame by frame, including
    /// batches holding several packets of one new flow and their replies.
    #[test]
    fn batch_equals_one_by_one(picks in proptest::collection::vec((0usize..64, any::<bool>()), 1..150)) {
        let t = shared_tables();
        let pool = flow_pool();
        let seq: Vec<(Vec<u8>, PortId)> = picks
            .iter()
            .map(|&(i, _)| {
                let f = pool[i % pool.len()].clone();
                let port = if f.len() > 50 && f[30..34] == [192, 168, 50, 1] { UPLINK } else { POD_A };
                (f, port)
            })
            .collect();
        let mut one = state();
        let single: Vec<(Verdict, Vec<u8>)> =
            seq.iter().map(|(f, port)| run(t, &mut one, 5, *port, f)).collect();
        let mut many = state();
        // Batches of consecutive frames with the same ingress port, cut where a pick says so.
        let mut i = 0;
        while i < seq.len() {
            let port = seq[i].1;
            let mut j = i + 1;
            while j < seq.len() && seq[j].1 == port && !picks[j].1 {
                j += 1;
            }
            let mut bufs: Vec<Vec<u8>> = seq[i..j]
                .iter()
                .map(|(f, _)| {
                    let mut b = vec![0u8; HEADROOM + f.len()];
                    b[HEADROOM..].copy_from_slice(f);
                    b
                })
                .collect();
            let mut frames: Vec<Frame<'_>> = bufs
                .iter_mut()
                .map(|b| {
                    let n = b.len() - HEADROOM;
                    Frame::new(b, HEADROOM, n)
                })
                .collect();
            let mut verdicts = vec![Verdict::PassToKernel; j - i];
            process_batch(t, &mut many, 5, port, &mut frames, &mut verdicts);
            for (k, (f, v)) in frames.iter().zip(&verdicts).enumerate() {
                prop_assert_eq!(*v, single[i + k].0, "frame {}", i + k);
                prop_assert_eq!(f.head(), &single[i + k].1[..], "frame {}", i + k);
            }
            i = j;
        }
        prop_assert_eq!(one.counters, many.counters);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// With two workers, `process_batch` leaves every frame another worker owns (by
    /// `steer::owner` of the frame as it arrived) untouched with `Verdict::Steer(owner)`, counted
    /// only as steered, and processes the others exactly as `process` does one by one.
    #[test]
    fn batch_steers_what_another_worker_owns(
        picks in proptest::collection::vec(0usize..64, 1..100),
        worker in 0u16..2,
    ) {
        let t = shared_tables();
        let pool = flow_pool();
        let seq: Vec<(Vec<u8>, PortId)> = picks
            .iter()
            .map(|&i| {
                let f = pool[i % pool.len()].clone();
                let port = if f.len() > 50 && f[30..34] == [192, 168, 50, 1] { UPLINK } else { POD_A };
                (f, port)
            })
            .collect();
        let me = Steer { worker, workers: 2 };
        let mut one = state();
        one.steer = me;
        let mut many = state();
        many.steer = me;
        let mut steered = 0;
        for (f, port) in &seq {
            let mut b = vec![0u8; HEADROOM + f.len()];
            b[HEADROOM..].copy_from_slice(f);
            let mut frames = [Frame::new(&mut b, HEADROOM, f.len())];
            let mut v = [Verdict::PassToKernel];
            process_batch(t, &mut many, 5, *port, &mut frames, &mut v);
            match crate::steer::owner(t, f, *port, 2) {
                Some(o) if o != usize::from(worker) => {
                    prop_assert_eq!(v[0], Verdict::Steer(o as u16));
                    prop_assert_eq!(&b[HEADROOM..], &f[..], "a steered frame is left as it came");
                    steered += 1;
                }
                _ => {
                    let (want, bytes) = run(t, &mut one, 5, *port, f);
                    prop_assert_eq!(v[0], want);
                    prop_assert_eq!(frames[0].head(), &bytes[..]);
                }
            }
        }
        prop_assert_eq!(many.counters.steered, steered);
        prop_assert_eq!(many.counters.rx, one.counters.rx);
        prop_assert_eq!(many.counters.tx, one.counters.tx);
    }
}

/// A test's event sink: what the pipeline emitted, in order.
#[derive(Clone, Debug, Default)]
struct Recorded(std::sync::Arc<std::sync::Mutex<Vec<FlowEvent>>>);

impl crate::events::EventSink for Recorded {
    fn emit(&mut self, ev: FlowEvent) {
        self.0.lock().unwrap().push(ev);
    }
}

fn with_events(s: &mut WorkerState) -> Recorded {
    let r = Recorded::default();
    s.events = Some(Box::new(r.clone()));
    r
}

fn drain(c: &mut Recorded) -> Vec<FlowEvent> {
    std::mem::take(&mut *c.0.lock().unwrap())
}

#[test]
fn events_new_connection_with_backend_and_tcp_end_with_counts() {
    let t = demo_tables();
    let mut s = state();
    let mut c = with_events(&mut s);
    let sp = sport_for(&t, B);
    let syn = demo::tcp_frame(&FrameSpec::from_pod(2, VIP, sp, 80), tcp::flags::SYN, b"");
    run(&t, &mut s, 1, POD_A, &syn);
    let evs = drain(&mut c);
    assert_eq!(evs.len(), 1);
    let e = evs[0];
    assert_eq!(e.kind, EventKind::NewConnection);
    assert_eq!((e.ts_ns, e.ingress, e.egress), (1, POD_A, Some(POD_B)));
    assert_eq!(e.tuple.map(|t| (t.dst, t.dst_port)), Some((VIP, 80)));
    assert_eq!(e.translated.map(|t| (t.dst, t.dst_port)), Some((B, 8080)));
    assert!(e.service.is_some());
    assert_eq!(e.policy, Some(PolicyVerdict::Allow { by: None }));
    assert!(!e.dropped());
    let synack = demo::tcp_frame(
        &FrameSpec::from_pod(3, A, 8080, sp),
        tcp::flags::SYN | tcp::flags::ACK,
        b"",
    );
    run(&t, &mut s, 2, POD_B, &synack);
    let rst = demo::tcp_frame(&FrameSpec::from_pod(2, VIP, sp, 80), tcp::flags::RST, b"");
    run(&t, &mut s, 3, POD_A, &rst);
    let evs = drain(&mut c);
    assert_eq!(evs.len(), 1, "{evs:?}");
    let e = evs[0];
    assert_eq!(e.kind, EventKind::ConnectionEnd);
    assert_eq!(e.counts.packets, [2, 1]);
    assert_eq!(e.counts.bytes, [80, 40]);
    assert_eq!(e.translated.map(|t| t.dst), Some(B));
}

#[test]
fn events_every_drop_with_its_reason_and_none_without_a_ring() {
    let t = demo_tables();
    let frames = [
        demo::tcp_frame(
            &FrameSpec::from_pod(2, [10, 244, 7, 1], 1, 80),
            tcp::flags::SYN,
            b"",
        ),
        demo::tcp_frame(
            &FrameSpec::from_pod(2, [10, 96, 0, 99], 1, 80),
            tcp::flags::SYN,
            b"",
        ),
        vec![0u8; 5],
    ];
    let mut s = state();
    let mut c = with_events(&mut s);
    for f in &frames {
        run(&t, &mut s, 1, POD_A, f);
    }
    let spoof = demo::tcp_frame(&FrameSpec::from_pod(2, B, 1, 80), tcp::flags::SYN, b"");
    run(&t, &mut s, 1, POD_B, &spoof);
    let evs = drain(&mut c);
    let reasons: Vec<_> = evs.iter().map(|e| e.drop).collect();
    assert_eq!(
        reasons,
        [
            Some(DropReason::NoRoute),
            Some(DropReason::NoBackend),
            Some(DropReason::Truncated),
            Some(DropReason::SpoofedSource)
        ]
    );
    assert!(evs.iter().all(|e| e.kind == EventKind::Drop));
    assert_eq!(evs[0].tuple.map(|t| t.dst), Some([10, 244, 7, 1]));
    assert_eq!(evs[2].tuple, None);
    assert_eq!(evs[3].tuple.map(|t| t.src), Some(A));
    // The same frames without a ring: same verdicts, nothing emitted anywhere.
    let mut s2 = state();
    for f in &frames {
        run(&t, &mut s2, 1, POD_A, f);
    }
    assert_eq!(s2.counters.drops, {
        let mut d = s.counters.drops;
        d[DropReason::SpoofedSource as usize] = 0;
        d
    });
}

/// The demo tables with pods A (`app: a`) and B (`app: b`) in namespace `default` and one
/// NetworkPolicy `name` there with `spec`.
fn tables_with_policy(name: &str, spec: serde_json::Value) -> Tables {
    use crate::policy::{PodInfo, PolicyInputs, PolicyTable};
    let pod = |name: &str, ip: [u8; 4], app: &str| PodInfo {
        namespace: "default".into(),
        name: name.into(),
        labels: [("app".to_owned(), app.to_owned())].into(),
        ip: ip.into(),
        ports: vec![],
        local: true,
    };
    let np: k8s_openapi::api::networking::v1::NetworkPolicy = serde_json::from_value(
        serde_json::json!({"metadata": {"name": name, "namespace": "default"}, "spec": spec}),
    )
    .unwrap();
    let ns: k8s_openapi::api::core::v1::Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "default"}})).unwrap();
    let policy = PolicyTable::compile(&PolicyInputs {
        namespaces: vec![ns],
        pods: vec![pod("a", A, "a"), pod("b", B, "b")],
        policies: vec![np],
        node_addrs: vec![],
    })
    .unwrap();
    demo::demo_builder().policy(policy).build().unwrap()
}

#[test]
fn events_policy_denial_names_direction() {
    let t = tables_with_policy(
        "deny-b",
        serde_json::json!({"podSelector": {"matchLabels": {"app": "b"}}, "policyTypes": ["Ingress"]}),
    );
    let mut s = state();
    let mut c = with_events(&mut s);
    let syn = demo::tcp_frame(&FrameSpec::from_pod(2, B, 1234, 80), tcp::flags::SYN, b"");
    let (v, _) = run(&t, &mut s, 5, POD_A, &syn);
    assert_eq!(v, Verdict::Drop(DropReason::PolicyDeniedIngress));
    let evs = drain(&mut c);
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0].kind, EventKind::PolicyVerdict);
    assert_eq!(evs[0].drop, Some(DropReason::PolicyDeniedIngress));
    assert_eq!(
        evs[0].policy,
        Some(PolicyVerdict::Deny {
            direction: Direction::Ingress
        })
    );
    assert_eq!(
        evs[0].tuple.map(|t| (t.src, t.dst, t.dst_port)),
        Some((A, B, 80))
    );
}

#[test]
fn egress_policy_covers_addresses_outside_the_cluster() {
    // Pod A may only reach 8.8.8.8/32 on UDP 53 outside the cluster.
    let t = tables_with_policy(
        "egress-a",
        serde_json::json!({"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Egress"],
                           "egress": [{"to": [{"ipBlock": {"cidr": "8.8.8.8/32"}}],
                                       "ports": [{"port": 53, "protocol": "UDP"}]}]}),
    );
    let mut s = state();
    let mut c = with_events(&mut s);
    // Allowed: back to the kernel, untracked.
    let dns = demo::udp_frame(&FrameSpec::from_pod(2, [8, 8, 8, 8], 4000, 53), b"q");
    assert_eq!(run(&t, &mut s, 1, POD_A, &dns).0, Verdict::PassToKernel);
    assert_eq!(s.conntrack.stats().entries, 0);
    // Another outside address, or another port: denied for egress, with the event.
    for (dst, port) in [([1, 1, 1, 1], 53), ([8, 8, 8, 8], 443)] {
        let f = demo::tcp_frame(
            &FrameSpec::from_pod(2, dst, 4001, port),
            tcp::flags::SYN,
            b"",
        );
        assert_eq!(
            run(&t, &mut s, 2, POD_A, &f).0,
            Verdict::Drop(DropReason::PolicyDeniedEgress),
            "{dst:?}:{port}"
        );
    }
    let evs = drain(&mut c);
    assert_eq!(evs.len(), 2);
    assert!(
        evs.iter()
            .all(|e| e.drop == Some(DropReason::PolicyDeniedEgress))
    );
    // Pod B, which no egress policy selects: straight to the kernel.
    let f = demo::udp_frame(&FrameSpec::from_pod(3, [1, 1, 1, 1], 4000, 53), b"q");
    assert_eq!(run(&t, &mut s, 3, POD_B, &f).0, Verdict::PassToKernel);
    assert!(t.policy.isolation(A.into()).egress);
    assert!(!t.policy.isolation(B.into()).egress);
}

#[test]
fn expiry_ends_flows_with_counts_once_and_within_budget() {
    const S: u64 = 1_000_000_000;
    let t = demo_tables();
    let mut s = state();
    let mut c = with_events(&mut s);
    // A UDP exchange A -> B (two datagrams out, one back), and a TCP flow reset by A.
    let udp = demo::udp_frame(&FrameSpec::from_pod(2, B, 5000, 6000), b"sluice");
    let back = demo::udp_frame(&FrameSpec::from_pod(3, A, 6000, 5000), b"ok");
    assert_eq!(run(&t, &mut s, S, POD_A, &udp).0, Verdict::Forward(POD_B));
    assert_eq!(run(&t, &mut s, S, POD_A, &udp).0, Verdict::Forward(POD_B));
    assert_eq!(run(&t, &mut s, S, POD_B, &back).0, Verdict::Forward(POD_A));
    let syn = demo::tcp_frame(&FrameSpec::from_pod(2, B, 7000, 80), tcp::flags::SYN, b"");
    let rst = demo::tcp_frame(&FrameSpec::from_pod(2, B, 7000, 80), tcp::flags::RST, b"");
    run(&t, &mut s, S, POD_A, &syn);
    run(&t, &mut s, S, POD_A, &rst);
    let before = drain(&mut c);
    assert_eq!(
        before
            .iter()
            .filter(|e| e.kind == EventKind::ConnectionEnd)
            .count(),
        1,
        "the reset ended the TCP flow: {before:?}"
    );
    assert_eq!(s.conntrack.len(), 2);

    // Nothing has expired yet: nothing removed, nothing emitted.
    assert_eq!(s.expire(2 * S, 1024), 0);
    assert!(drain(&mut c).is_empty());

    // Long after every timeout: a budget of one slot removes at most one entry per call.
    let late = 1000 * S;
    let mut removed = 0;
    for _ in 0..1024 {
        let n = s.expire(late, 1);
        assert!(n <= 1);
        removed += n;
    }
    assert_eq!(removed, 2);
    assert_eq!(s.conntrack.len(), 0);
    let evs = drain(&mut c);
    assert_eq!(evs.len(), 1, "only the UDP flow ends on expiry: {evs:?}");
    let e = evs[0];
    assert_eq!(e.kind, EventKind::ConnectionEnd);
    assert_eq!(e.ts_ns, late);
    assert_eq!(
        e.tuple.map(|t| (t.src, t.dst, t.dst_port)),
        Some((A, B, 6000))
    );
    assert_eq!(e.counts.packets, [2, 1]);
    let ip_len = |f: &[u8]| u64::from(u16::from_be_bytes([f[16], f[17]]));
    assert_eq!(
        e.counts.bytes,
        [2 * ip_len(&udp), ip_len(&back)],
        "IP bytes both ways"
    );
}

#[test]
fn expire_due_sweeps_at_most_once_per_interval() {
    let t = demo_tables();
    let mut s = state();
    let udp = demo::udp_frame(&FrameSpec::from_pod(2, B, 5000, 6000), b"x");
    let late = 1_000_000_000_000;
    run(&t, &mut s, 0, POD_A, &udp);
    assert_eq!(s.expire_due(late), 1, "the first call sweeps");
    // Expired again at once (created at time 0), but the next sweep is one interval later.
    run(&t, &mut s, 0, POD_A, &udp);
    assert_eq!(s.expire_due(late + EXPIRE_INTERVAL_NS - 1), 0);
    assert_eq!(s.conntrack.len(), 1);
    assert_eq!(s.expire_due(late + EXPIRE_INTERVAL_NS), 1);
}

#[test]
fn bytes_are_counted_in_and_out() {
    let t = demo_tables();
    let mut s = state();
    // Local delivery keeps the length; towards another node VXLAN adds 50 bytes.
    let local = demo::udp_frame(&FrameSpec::from_pod(2, B, 5000, 6000), b"sluice");
    let remote = demo::udp_frame(&FrameSpec::from_pod(2, R, 5000, 6000), b"sluice");
    let junk = [0u8; 20];
    run(&t, &mut s, 1, POD_A, &local);
    run(&t, &mut s, 1, POD_A, &remote);
    run(&t, &mut s, 1, POD_A, &junk);
    let n = |f: &[u8]| f.len() as u64;
    assert_eq!(s.counters.rx_bytes, n(&local) + n(&remote) + n(&junk));
    assert_eq!(s.counters.tx_bytes, n(&local) + n(&remote) + 50);
}

/// How a test connection ends.
#[derive(Clone, Copy, Debug)]
enum Close {
    FinByClient,
    FinByServer,
    RstByClient,
    RstByServer,
}

const CLOSES: [Close; 4] = [
    Close::FinByClient,
    Close::FinByServer,
    Close::RstByClient,
    Close::RstByServer,
];

/// The two ends of a TCP connection to pod B: the client's frames (pod A, or an outside host
/// through the uplink for a NodePort) and B's answers, at the addresses each side uses.
#[derive(Clone, Copy, Debug)]
struct Conn {
    client: FrameSpec,
    client_port: PortId,
    /// B's frames: from B's port to the address B sees the client at.
    server: FrameSpec,
    /// Where the client's frames go, and B's.
    to_server: Verdict,
    to_client: Verdict,
}

impl Conn {
    /// Pod A to pod B:80.
    fn direct(sp: u16) -> Self {
        Conn {
            client: FrameSpec::from_pod(2, B, sp, 80),
            client_port: POD_A,
            server: FrameSpec::from_pod(3, A, 80, sp),
            to_server: Verdict::Forward(POD_B),
            to_client: Verdict::Forward(POD_A),
        }
    }

    /// Pod A to the web VIP, balanced to B:8080 (`sp` from [`sport_for`]).
    fn via_vip(sp: u16) -> Self {
        Conn {
            client: FrameSpec::from_pod(2, VIP, sp, 80),
            server: FrameSpec::from_pod(3, A, 8080, sp),
            ..Conn::direct(sp)
        }
    }

    /// An outside host to this node's NodePort 30080, balanced to B:8080 and SNATed to the VTEP
    /// address (the default steering share keeps the client's port).
    fn node_port(t: &Tables) -> Self {
        let spec = |sp| FrameSpec {
            src_mac: Mac([9; 6]),
            dst_mac: demo::NODE_MAC,
            src: [203, 0, 113, 5],
            dst: [192, 168, 50, 1],
            src_port: sp,
            dst_port: 30080,
        };
        let sp = (1000u16..3000)
            .find(|&sp| {
                let syn = demo::tcp_frame(&spec(sp), tcp::flags::SYN, b"");
                run(t, &mut state(), 1, UPLINK, &syn).0 == Verdict::Forward(POD_B)
            })
            .unwrap();
        Conn {
            client: spec(sp),
            client_port: UPLINK,
            server: FrameSpec::from_pod(3, [10, 244, 1, 0], 8080, sp),
            to_server: Verdict::Forward(POD_B),
            to_client: Verdict::Forward(UPLINK),
        }
    }

    fn client_sends(&self, t: &Tables, s: &mut WorkerState, now: u64, flags: u8) -> Verdict {
        let f = demo::tcp_frame(&self.client, flags, b"");
        run(t, s, now, self.client_port, &f).0
    }

    fn server_sends(&self, t: &Tables, s: &mut WorkerState, now: u64, flags: u8) -> Verdict {
        let f = demo::tcp_frame(&self.server, flags, b"");
        run(t, s, now, POD_B, &f).0
    }

    /// Handshake and `close`; every packet is delivered.
    fn open_and_close(&self, t: &Tables, s: &mut WorkerState, now: u64, close: Close) {
        let syn = self.client_sends(t, s, now, tcp::flags::SYN);
        assert_eq!(syn, self.to_server);
        self.answer_and_close(t, s, now, close);
    }

    /// The rest of [`Self::open_and_close`] after the client's SYN.
    fn answer_and_close(&self, t: &Tables, s: &mut WorkerState, now: u64, close: Close) {
        use tcp::flags::{ACK, FIN, RST, SYN};
        let c =
            |s: &mut WorkerState, f| assert_eq!(self.client_sends(t, s, now, f), self.to_server);
        let b =
            |s: &mut WorkerState, f| assert_eq!(self.server_sends(t, s, now, f), self.to_client);
        b(s, SYN | ACK);
        c(s, ACK);
        match close {
            Close::FinByClient => {
                c(s, FIN | ACK);
                b(s, ACK);
                b(s, FIN | ACK);
                c(s, ACK);
            }
            Close::FinByServer => {
                b(s, FIN | ACK);
                c(s, ACK);
                c(s, FIN | ACK);
                b(s, ACK);
            }
            Close::RstByClient => c(s, RST),
            Close::RstByServer => b(s, RST | ACK),
        }
    }
}

/// The state of the one conntrack entry of the client's key.
fn ct_state(s: &mut WorkerState, c: &Conn) -> Option<CtState> {
    let key = tuple(&demo::tcp_frame(&c.client, 0, b""));
    let (h, _) = s.conntrack.lookup(&key, 0)?;
    s.conntrack.get(h).map(|e| e.state())
}

/// A SYN that reuses the 5-tuple of a closed connection (TIME_WAIT or CLOSE) is a new connection:
/// the policy of now decides it, for pod-to-pod, ClusterIP and NodePort flows, whatever closed
/// the old one.
#[test]
fn syn_over_a_closed_connection_meets_the_current_policy() {
    let open = demo_tables();
    let deny_b = tables_with_policy(
        "deny-b",
        serde_json::json!({"podSelector": {"matchLabels": {"app": "b"}}, "policyTypes": ["Ingress"]}),
    );
    let conns = [
        Conn::direct(40000),
        Conn::via_vip(sport_for(&open, B)),
        Conn::node_port(&open),
    ];
    for conn in conns {
        for close in CLOSES {
            let what = format!("{close:?} {conn:?}");
            let mut s = state();
            conn.open_and_close(&open, &mut s, 1, close);
            let closed = ct_state(&mut s, &conn);
            assert!(
                matches!(closed, Some(CtState::TcpTimeWait | CtState::TcpClose)),
                "{closed:?} {what}"
            );
            let mut c = with_events(&mut s);
            assert_eq!(
                conn.client_sends(&deny_b, &mut s, 2, tcp::flags::SYN),
                Verdict::Drop(DropReason::PolicyDeniedIngress),
                "{what}"
            );
            let evs = drain(&mut c);
            assert_eq!(evs.len(), 1, "{what}: {evs:?}");
            assert_eq!(evs[0].kind, EventKind::PolicyVerdict, "{what}");
            assert_eq!(evs[0].drop, Some(DropReason::PolicyDeniedIngress));
            assert_eq!(evs[0].tuple.map(|t| t.src_port), Some(conn.client.src_port));
            assert_eq!(s.conntrack.len(), 0, "the closed entry is gone: {what}");
            // The same again with no policy: a new connection, announced as one.
            let mut s = state();
            conn.open_and_close(&open, &mut s, 1, close);
            let mut c = with_events(&mut s);
            assert_eq!(
                conn.client_sends(&open, &mut s, 2, tcp::flags::SYN),
                conn.to_server,
                "{what}"
            );
            let evs = drain(&mut c);
            assert_eq!(
                evs.iter().map(|e| e.kind).collect::<Vec<_>>(),
                [EventKind::NewConnection],
                "{what}"
            );
            assert_eq!(ct_state(&mut s, &conn), Some(CtState::TcpSynSent), "{what}");
            assert_eq!(s.conntrack.len(), 1, "{what}");
        }
    }
}

/// The other side reopening: a SYN from B to the client's address and port, over a closed
/// connection, is B's new connection and meets the policy of now (here A's ingress).
#[test]
fn reply_side_syn_over_a_closed_connection_meets_the_current_policy() {
    let open = demo_tables();
    let deny_a = tables_with_policy(
        "deny-a",
        serde_json::json!({"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Ingress"]}),
    );
    for conn in [Conn::direct(40001), Conn::via_vip(sport_for(&open, B))] {
        for close in CLOSES {
            let what = format!("{close:?} {conn:?}");
            let mut s = state();
            conn.open_and_close(&open, &mut s, 1, close);
            assert_eq!(
                conn.server_sends(&deny_a, &mut s, 2, tcp::flags::SYN),
                Verdict::Drop(DropReason::PolicyDeniedIngress),
                "{what}"
            );
            assert_eq!(s.conntrack.len(), 0, "{what}");
            // Allowed: B's connection to A, tracked from B's side, and A's answer is its reply.
            let mut s = state();
            conn.open_and_close(&open, &mut s, 1, close);
            assert_eq!(
                conn.server_sends(&open, &mut s, 2, tcp::flags::SYN),
                Verdict::Forward(POD_A),
                "{what}"
            );
            let b_key = tuple(&demo::tcp_frame(&conn.server, 0, b""));
            assert_eq!(
                s.conntrack.lookup(&b_key, 2).map(|(_, d)| d),
                Some(FlowDir::Original),
                "{what}"
            );
            assert_eq!(s.conntrack.len(), 1, "{what}");
        }
    }
}

/// Inside a live connection a SYN is not a new connection (Linux ignores a retransmitted one, and
/// a SYN over an established one is invalid): the policy of the time the connection opened stands.
#[test]
fn syn_inside_a_live_connection_is_not_a_new_one() {
    use tcp::flags::{ACK, SYN};
    let open = demo_tables();
    let deny_b = tables_with_policy(
        "deny-b",
        serde_json::json!({"podSelector": {"matchLabels": {"app": "b"}}, "policyTypes": ["Ingress"]}),
    );
    let conn = Conn::direct(40002);
    let mut s = state();
    assert_eq!(conn.client_sends(&open, &mut s, 1, SYN), conn.to_server);
    // A retransmitted SYN after the policy changed: the same connection, still SYN_SENT.
    assert_eq!(conn.client_sends(&deny_b, &mut s, 2, SYN), conn.to_server);
    assert_eq!(
        conn.server_sends(&deny_b, &mut s, 3, SYN | ACK),
        conn.to_client
    );
    assert_eq!(conn.client_sends(&deny_b, &mut s, 4, ACK), conn.to_server);
    assert_eq!(ct_state(&mut s, &conn), Some(CtState::TcpEstablished));
    assert_eq!(s.conntrack.len(), 1);
}

/// What may happen to one 5-tuple between A:40100 and B:80 (or the VIP) in the property test.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// Open and close a connection (when the policy of the moment allows it; else it is denied).
    Session(Close, bool),
    /// Publish another table: 0 no policy, 1 B isolated for ingress, 2 B open to `app: a` on
    /// port 80 only, 3 A isolated for egress, 4 A isolated for ingress.
    Policy(usize),
    /// Let time pass (seconds).
    Wait(u16),
}

fn policy_tables() -> Vec<Tables> {
    let deny = |name: &str, app: &str, ty: &str| {
        tables_with_policy(
            name,
            serde_json::json!({"podSelector": {"matchLabels": {"app": app}}, "policyTypes": [ty]}),
        )
    };
    vec![
        demo_tables(),
        deny("deny-b", "b", "Ingress"),
        tables_with_policy(
            "b-80-from-a",
            serde_json::json!({"podSelector": {"matchLabels": {"app": "b"}}, "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "a"}}}],
                             "ports": [{"port": 80, "protocol": "TCP"}]}]}),
        ),
        deny("a-egress", "a", "Egress"),
        deny("deny-a", "a", "Ingress"),
    ]
}

fn step_strategy() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0usize..4, any::<bool>()).prop_map(|(c, vip)| Step::Session(CLOSES[c], vip)),
        2 => (0usize..5).prop_map(Step::Policy),
        1 => (0u16..300).prop_map(Step::Wait),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// After any sequence of connections over one 5-tuple, closed every way, with policy changes
    /// and time in between, a new SYN from either side gets the verdict (and the rewrite) a worker
    /// that never saw the tuple would give it under the tables of now.
    #[test]
    fn new_syn_after_closes_is_decided_like_a_fresh_table(
        steps in proptest::collection::vec(step_strategy(), 0..12),
        last_vip in any::<bool>(),
        last_from_server in any::<bool>(),
    ) {
        const SEC: u64 = 1_000_000_000;
        let tables = policy_tables();
        let sp = sport_for(&tables[0], B);
        let conn = |vip: bool| if vip { Conn::via_vip(sp) } else { Conn::direct(sp) };
        let mut s = state();
        let mut now = SEC;
        let mut t = 0;
        for step in steps {
            match step {
                Step::Session(close, vip) => {
                    let c = conn(vip);
                    // Denied SYNs are part of the history too; allowed ones go on and close.
                    if c.client_sends(&tables[t], &mut s, now, tcp::flags::SYN) == c.to_server {
                        c.answer_and_close(&tables[t], &mut s, now, close);
                    }
                }
                Step::Policy(i) => t = i,
                Step::Wait(secs) => now += u64::from(secs) * SEC,
            }
            now += 1;
        }
        let c = conn(last_vip);
        let (frame, port) = if last_from_server {
            (demo::tcp_frame(&c.server, tcp::flags::SYN, b""), POD_B)
        } else {
            (demo::tcp_frame(&c.client, tcp::flags::SYN, b""), c.client_port)
        };
        let got = run(&tables[t], &mut s, now, port, &frame);
        let want = run(&tables[t], &mut state(), now, port, &frame);
        prop_assert_eq!(got, want);
    }
}

/// `trace`: the same stage code as `process`, read-only.
mod tracing {
    use super::*;
    use crate::policy::Direction;
    use crate::trace::{TraceStage, TraceStep};

    /// Trace one frame; the verdict, the frame's bytes afterwards and the steps.
    fn traced(
        t: &Tables,
        s: &WorkerState,
        now: u64,
        port: PortId,
        bytes: &[u8],
    ) -> (Verdict, Vec<u8>, Vec<TraceStep>) {
        let mut buf = vec![0u8; HEADROOM + bytes.len()];
        buf[HEADROOM..].copy_from_slice(bytes);
        let mut f = Frame::new(&mut buf, HEADROOM, bytes.len());
        let mut steps = Vec::new();
        let v = trace(t, s, now, port, &mut f, &mut steps);
        (v, f.head().to_vec(), steps)
    }

    fn flags_of(sp: u16) -> u8 {
        if sp.is_multiple_of(2) {
            tcp::flags::SYN
        } else {
            tcp::flags::RST
        }
    }

    fn outside(sp: u16, dst: [u8; 4], dport: u16) -> FrameSpec {
        FrameSpec {
            src_mac: Mac([9; 6]),
            dst_mac: demo::NODE_MAC,
            src: [203, 0, 113, 5],
            dst,
            src_port: sp,
            dst_port: dport,
        }
    }

    /// Frames of every kind the pipeline tells apart, with their ingress port: pod A's flows to
    /// the VIPs (one with affinity, one without backends), pod to pod on the node and across, the
    /// replies, NodePort from outside and B's answers to the VTEP address, ICMP errors about
    /// tracked flows and about nothing, no route, the kernel, a spoofed source, garbage.
    fn pool() -> Vec<(Vec<u8>, PortId)> {
        use tcp::flags::{ACK, FIN, RST, SYN};
        let mut v: Vec<(Vec<u8>, PortId)> = flow_pool()
            .into_iter()
            .map(|f| {
                let port = if f.len() > 50 && f[30..34] == [192, 168, 50, 1] {
                    UPLINK
                } else {
                    POD_A
                };
                (f, port)
            })
            .collect();
        for sp in [2000u16, 2001] {
            for flags in [SYN, SYN | ACK, ACK, FIN | ACK, RST] {
                v.push((
                    demo::tcp_frame(&FrameSpec::from_pod(2, B, sp, 80), flags, b""),
                    POD_A,
                ));
                v.push((
                    demo::tcp_frame(&FrameSpec::from_pod(3, A, 80, sp), flags, b""),
                    POD_B,
                ));
                v.push((
                    demo::tcp_frame(&FrameSpec::from_pod(3, A, 8080, sp), flags, b""),
                    POD_B,
                ));
                v.push((
                    demo::tcp_frame(&outside(sp, [192, 168, 50, 1], 30080), flags, b""),
                    UPLINK,
                ));
                v.push((
                    demo::tcp_frame(
                        &FrameSpec::from_pod(3, [10, 244, 1, 0], 8080, sp),
                        flags,
                        b"",
                    ),
                    POD_B,
                ));
            }
            // Pod A straight to B's backend port, from ports its VIP flows use (their reply keys
            // collide), and B's answers.
            for vsp in [1000u16, 1001] {
                v.push((
                    demo::tcp_frame(&FrameSpec::from_pod(2, B, vsp, 8080), flags_of(sp), b""),
                    POD_A,
                ));
                v.push((
                    demo::tcp_frame(&FrameSpec::from_pod(3, A, 8080, vsp), ACK, b""),
                    POD_B,
                ));
            }
            let syn = demo::tcp_frame(&FrameSpec::from_pod(2, VIP, sp, 80), SYN, b"");
            v.push((
                demo::icmp_error_frame(&FrameSpec::from_pod(3, A, 0, 0), 3, 3, &syn),
                POD_B,
            ));
            let unrelated = demo::tcp_frame(&FrameSpec::from_pod(2, B, 9, 9), SYN, b"");
            v.push((
                demo::icmp_error_frame(&FrameSpec::from_pod(3, A, 0, 0), 3, 1, &unrelated),
                POD_B,
            ));
        }
        for (dst, dport) in [
            ([10, 96, 0, 99], 80),
            ([10, 244, 7, 1], 80),
            ([10, 244, 1, 99], 80),
            ([8, 8, 8, 8], 53),
            ([10, 244, 1, 0], 22),
        ] {
            v.push((
                demo::tcp_frame(&FrameSpec::from_pod(2, dst, 3000, dport), SYN, b""),
                POD_A,
            ));
        }
        v.push((
            demo::udp_frame(&outside(7, [192, 168, 50, 1], 53), b"x"),
            UPLINK,
        ));
        // A's frame on B's port.
        v.push((
            demo::tcp_frame(&FrameSpec::from_pod(2, B, 4000, 80), SYN, b""),
            POD_B,
        ));
        v.push((vec![0xff; 14], POD_A));
        v
    }

    fn tables() -> &'static [Tables] {
        static T: std::sync::OnceLock<Vec<Tables>> = std::sync::OnceLock::new();
        T.get_or_init(policy_tables)
    }

    /// The steps tell the verdict's story: they end with it, and a drop's reason has the step
    /// that decided it.
    fn consistent(steps: &[TraceStep], v: Verdict) -> Result<(), TestCaseError> {
        prop_assert!(matches!(steps.last(), Some(TraceStep::Verdict(x)) if *x == v));
        let has = |f: &dyn Fn(&TraceStep) -> bool| steps.iter().any(f);
        let decided = match v {
            Verdict::Drop(DropReason::PolicyDeniedEgress) => has(&|s| {
                matches!(
                    s,
                    TraceStep::Policy {
                        verdict: PolicyVerdict::Deny {
                            direction: Direction::Egress
                        },
                        ..
                    }
                )
            }),
            Verdict::Drop(DropReason::PolicyDeniedIngress) => has(&|s| {
                matches!(
                    s,
                    TraceStep::Policy {
                        verdict: PolicyVerdict::Deny {
                            direction: Direction::Ingress
                        },
                        ..
                    }
                )
            }),
            Verdict::Drop(DropReason::NoBackend) => has(&|s| {
                matches!(
                    s,
                    TraceStep::Service {
                        outcome: ServiceOutcome::NoBackend,
                        ..
                    }
                )
            }),
            Verdict::Drop(DropReason::NoRoute) => has(&|s| {
                matches!(
                    s,
                    TraceStep::Route {
                        route: Route::NoRoute,
                        ..
                    }
                )
            }),
            Verdict::Forward(_) | Verdict::Segment(_) => has(&|s| s.stage() == TraceStage::Route),
            _ => true,
        };
        prop_assert!(decided, "{:?} without its step in {:?}", v, steps);
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// For random frames (a scenario of six from the pool, in any order, sometimes mutated)
        /// over random policy tables, worker states built by the
        /// frames before, time passing (entries expire) and conntrack tables small enough to
        /// evict: the trace's verdict and rewritten frame are what `process` then does to the
        /// same frame, and the trace changes nothing: counters, conntrack and events stay as they
        /// were, and a worker whose frames were traced first processes every frame exactly as
        /// one that never traced (verdicts, bytes, NAT ports, affinity, counters, events).
        #[test]
        fn a_trace_tells_what_process_does_and_changes_nothing(
            scenario in proptest::collection::vec(0usize..512, 6),
            steps in proptest::collection::vec(
                (0usize..6, 0usize..5, 0usize..4, any::<Option<(usize, u8)>>()),
                1..60,
            ),
            small in any::<bool>(),
            worker in 0u16..2,
        ) {
            let pool = pool();
            let new_state = || {
                let mut s = WorkerState::new(WorkerConfig {
                    conntrack: CtConfig::with_capacity(if small { 6 } else { 1024 }),
                    affinity_capacity: 64,
                });
                s.steer = Steer { worker, workers: 2 };
                s
            };
            let mut traced_state = new_state();
            let mut plain = new_state();
            let mut ev_traced = with_events(&mut traced_state);
            let mut ev_plain = with_events(&mut plain);
            let mut now = 1_000_000_000u64;
            for (i, (pick, table, dt, flip)) in steps.into_iter().enumerate() {
                let t = &tables()[table];
                let (mut f, port) = pool[scenario[pick] % pool.len()].clone();
                if let Some((at, x)) = flip.filter(|(at, _)| at % 8 == 0) {
                    let n = f.len();
                    f[at % n] ^= x;
                }
                now += [1, 1_000_000, 20_000_000_000, 200_000_000_000][dt];
                let counters = traced_state.counters.clone();
                let ct = traced_state.conntrack.stats();
                let (tv, tbytes, tsteps) = traced(t, &traced_state, now, port, &f);
                prop_assert_eq!(&traced_state.counters, &counters, "frame {}", i);
                prop_assert_eq!(traced_state.conntrack.stats(), ct, "frame {}", i);
                prop_assert!(drain(&mut ev_traced).is_empty(), "frame {}: a trace emitted", i);
                consistent(&tsteps, tv)?;
                let (pv, pbytes) = run(t, &mut traced_state, now, port, &f);
                prop_assert_eq!(tv, pv, "frame {}: {:?}", i, tsteps);
                prop_assert_eq!(&tbytes, &pbytes, "frame {}", i);
                let (qv, qbytes) = run(t, &mut plain, now, port, &f);
                prop_assert_eq!(pv, qv, "frame {}", i);
                prop_assert_eq!(&pbytes, &qbytes, "frame {}", i);
                prop_assert_eq!(drain(&mut ev_traced), drain(&mut ev_plain), "frame {}", i);
            }
            prop_assert_eq!(&traced_state.counters, &plain.counters);
            prop_assert_eq!(traced_state.conntrack.stats(), plain.conntrack.stats());
        }
    }

    /// A cluster-IP flow, step by step: a SYN is a miss that picks a Maglev slot and backend,
    /// passes policy, would be inserted and DNATed and forwarded; after `process` took it, the
    /// next packet is a hit in SYN_SENT, reverse translated.
    #[test]
    fn a_new_flow_then_an_established_one() {
        let t = demo_tables();
        let mut s = state();
        let sp = sport_for(&t, B);
        let syn = demo::tcp_frame(&FrameSpec::from_pod(2, VIP, sp, 80), tcp::flags::SYN, b"");
        let (v, _, steps) = traced(&t, &s, 1, POD_A, &syn);
        assert_eq!(v, Verdict::Forward(POD_B));
        let stages: Vec<&str> = steps.iter().map(|s| s.stage().as_str()).collect();
        assert_eq!(
            stages,
            [
                "parse",
                "source",
                "conntrack",
                "service",
                "route",
                "policy",
                "conntrack",
                "nat",
                "verdict"
            ]
        );
        assert!(matches!(
            steps[3],
            TraceStep::Service {
                outcome: ServiceOutcome::Backend {
                    ip: B,
                    port: 8080,
                    ..
                },
                how: service::Choice::Maglev {
                    affinity: false,
                    ..
                },
                ..
            }
        ));
        assert!(s.conntrack.is_empty(), "a trace inserts nothing");
        assert_eq!(run(&t, &mut s, 1, POD_A, &syn).0, Verdict::Forward(POD_B));
        let reply = demo::tcp_frame(
            &FrameSpec::from_pod(3, A, 8080, sp),
            tcp::flags::SYN | tcp::flags::ACK,
            b"",
        );
        let (v, _, steps) = traced(&t, &s, 2, POD_B, &reply);
        assert_eq!(v, Verdict::Forward(POD_A));
        assert!(steps.iter().any(|st| matches!(
            st,
            TraceStep::Conntrack(CtStep::Hit {
                dir: FlowDir::Reply,
                after: CtState::TcpSynRecv,
                ..
            })
        )));
        assert!(
            steps
                .iter()
                .any(|st| matches!(st, TraceStep::Nat { to, .. } if to.src == VIP))
        );
        // The entry is still in SYN_SENT: the trace's SYN/ACK was not accounted.
        let key = tuple(&syn);
        let (h, _) = s.conntrack.lookup(&key, 3).unwrap();
        assert_eq!(s.conntrack.get(h).unwrap().state(), CtState::TcpSynSent);
    }

    /// A sessionAffinity client: the first trace says Maglev (and remembers nothing); after the
    /// first real flow, a trace says the backend is remembered.
    #[test]
    fn affinity_is_read_not_written() {
        let t = demo_tables();
        let mut s = state();
        let q = |sp| demo::udp_frame(&FrameSpec::from_pod(2, [10, 96, 0, 53], sp, 53), b"q");
        let how = |s: &WorkerState, sp| {
            traced(&t, s, 1, POD_A, &q(sp))
                .2
                .iter()
                .find_map(|st| match st {
                    TraceStep::Service { how, .. } => Some(*how),
                    _ => None,
                })
                .unwrap()
        };
        assert!(matches!(
            how(&s, 1),
            service::Choice::Maglev { affinity: true, .. }
        ));
        assert!(matches!(
            how(&s, 2),
            service::Choice::Maglev { affinity: true, .. }
        ));
        run(&t, &mut s, 1, POD_A, &q(1));
        assert!(matches!(how(&s, 3), service::Choice::Remembered { .. }));
    }
}
