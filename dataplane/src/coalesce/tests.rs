//! Tests of GRO: unit cases, a property test over random multi-flow batches, and frames made by a
//! kernel Flannel node.

use super::*;
use crate::checksum::Checksum;
use crate::pcap;
use crate::segment::tests::{Seg, pattern, tcp_frame, ts_option, udp_frame};
use crate::vxlan;
use proptest::prelude::*;

/// A batch of frames in their buffers, as a worker holds them.
#[derive(Default)]
struct Batch {
    heads: Vec<Vec<u8>>,
    tails: Vec<Vec<Vec<u8>>>,
}

/// One planned frame as the worker would send it, and the batch frames in it.
struct Out {
    bytes: Vec<u8>,
    members: Vec<usize>,
    segments: usize,
}

impl Batch {
    /// Add a frame: `head` bytes in the first buffer, the rest in tail buffers of `chunk` bytes.
    fn push(&mut self, bytes: &[u8], head: usize, chunk: usize) {
        let head = head.min(bytes.len());
        self.heads.push(bytes[..head].to_vec());
        self.tails.push(
            bytes[head..]
                .chunks(chunk.max(1))
                .map(<[u8]>::to_vec)
                .collect(),
        );
    }

    fn coalesce(&mut self, trust: ChecksumTrust) -> Vec<Out> {
        let tails: Vec<Vec<&[u8]>> = self
            .tails
            .iter()
            .map(|t| t.iter().map(Vec::as_slice).collect())
            .collect();
        let mut frames: Vec<Frame<'_>> = self
            .heads
            .iter_mut()
            .zip(&tails)
            .map(|(h, t)| {
                let n = h.len();
                Frame::new(h, 0, n).with_tail(t)
            })
            .collect();
        let mut plan = vec![Merged::default(); frames.len()];
        let n = coalesce(&mut frames, trust, &mut plan);
        plan[..n]
            .iter()
            .map(|m| {
                let f = &frames[m.first()];
                let mut bytes = f.head().to_vec();
                f.tail().iter().for_each(|t| bytes.extend_from_slice(t));
                let mut members = vec![m.first()];
                for p in m.pieces() {
                    let (i, b) = (usize::from(p.frame), usize::from(p.buf));
                    let buf: &[u8] = if b == 0 {
                        frames[i].head()
                    } else {
                        tails[i][b - 1]
                    };
                    let (off, len) = (p.off as usize, p.len as usize);
                    bytes.extend_from_slice(&buf[off..off + len]);
                    if members.last() != Some(&i) {
                        members.push(i);
                    }
                }
                Out {
                    bytes,
                    members,
                    segments: m.segments(),
                }
            })
            .collect()
    }
}

/// What a TCP frame says: (flow ports, seq, flags, payload).
fn tcp_of(f: &[u8]) -> (u32, u32, u8, &[u8]) {
    let ip = ipv4::Packet::new_checked(&f[L3..]).unwrap();
    let (l4, end) = (L3 + ip.header_len(), L3 + usize::from(ip.total_len()));
    let t = tcp::Packet::new_checked(&f[l4..end]).unwrap();
    let ports = u32::from(t.src_port()) << 16 | u32::from(t.dst_port());
    (ports, t.seq(), t.flags(), &f[l4 + t.header_len()..end])
}

/// Whether the TCP checksum of `f` verifies; `None` if it is partial.
fn tcp_verifies(f: &[u8]) -> Option<bool> {
    let ip = ipv4::Packet::new_checked(&f[L3..]).unwrap();
    let l4 = &f[L4..L3 + usize::from(ip.total_len())];
    let t = tcp::Packet::new_checked(l4).unwrap();
    let len = l4.len() as u16;
    if t.checksum() == checksum::pseudo_header_folded(ip.src(), ip.dst(), proto::TCP, len) {
        return None;
    }
    let mut c = Checksum::new();
    c.add_u32(checksum::pseudo_header_sum(
        ip.src(),
        ip.dst(),
        proto::TCP,
        len,
    ));
    c.add_bytes(l4);
    Some(c.fold() == 0xffff)
}

/// Checks every plan must pass: each frame sent once, merges only of one flow's contiguous
/// segments, headers consistent, payload the members' in order, per-flow order kept.
fn check_plan(inputs: &[Vec<u8>], outs: &[Out]) {
    let mut seen = vec![false; inputs.len()];
    let mut last_of_flow = std::collections::HashMap::new();
    for o in outs {
        assert_eq!(o.members.len(), o.segments);
        let ip = ipv4::Packet::new_checked(&o.bytes[L3..]).unwrap();
        assert!(ip.verify_checksum());
        if ip.protocol() != proto::TCP {
            assert_eq!(o.bytes, inputs[o.members[0]], "not TCP: passed as it was");
            seen[o.members[0]] = true;
            continue;
        }
        let (ports, seq, _, payload) = tcp_of(&o.bytes);
        let mut want = Vec::new();
        let mut next = seq;
        for (k, &i) in o.members.iter().enumerate() {
            assert!(!std::mem::replace(&mut seen[i], true), "frame {i} twice");
            let (p, s, fl, pay) = tcp_of(&inputs[i]);
            assert_eq!(
                (p, s),
                (ports, next),
                "member {i} of another flow or out of order"
            );
            assert_eq!(inputs[i][L3 + 12..L3 + 20], o.bytes[L3 + 12..L3 + 20]);
            if o.segments > 1 {
                assert_eq!(fl & NEVER, 0);
                assert!(k == 0 || fl & tcp::flags::CWR == 0);
                assert!(k + 1 == o.members.len() || fl & tcp::flags::PSH == 0);
            }
            next = s.wrapping_add(pay.len() as u32);
            want.extend_from_slice(pay);
            if let Some(prev) = last_of_flow.insert(p, i) {
                assert!(prev < i, "flow reordered: {prev} after {i}");
            }
        }
        assert_eq!(payload, &want[..]);
        assert!(usize::from(ip.total_len()) <= MAX_IP_LEN);
    }
    assert!(seen.iter().all(|&s| s), "a frame was left out");
}

/// Plan `inputs` (each in one buffer) and check the plan.
fn plan_single(inputs: &[Vec<u8>], trust: ChecksumTrust) -> Vec<Out> {
    let mut b = Batch::default();
    inputs.iter().for_each(|f| b.push(f, f.len(), 1));
    let outs = b.coalesce(trust);
    check_plan(inputs, &outs);
    outs
}

fn bulk(n: usize, mss: usize, s: &Seg) -> Vec<Vec<u8>> {
    (0..n)
        .map(|k| {
            let seg = Seg {
                seq: s.seq.wrapping_add((k * mss) as u32),
                ..s.clone()
            };
            tcp_frame(&seg, &pattern(mss, k as u8))
        })
        .collect()
}

#[test]
fn bulk_stream_merges_into_18_buffer_frames() {
    let s = Seg {
        options: ts_option(1, 2),
        ..Seg::default()
    };
    let inputs = bulk(45, 1398, &s);
    let outs = plan_single(&inputs, ChecksumTrust::Derive);
    let sizes: Vec<usize> = outs.iter().map(|o| o.segments).collect();
    assert_eq!(sizes, vec![18, 18, 9]);
    for o in &outs {
        assert_eq!(tcp_verifies(&o.bytes), Some(true));
        assert_eq!(o.bytes.len(), L4 + 32 + o.segments * 1398);
    }
}

#[test]
fn psh_window_and_padding() {
    // Short segments (4 bytes: 58-byte frames, padded to 60) with PSH on the third.
    let mut inputs = Vec::new();
    for k in 0..4u16 {
        let s = Seg {
            seq: 1000 + u32::from(k) * 4,
            window: 500 + k,
            flags: tcp::flags::ACK | if k == 2 { tcp::flags::PSH } else { 0 },
            ..Seg::default()
        };
        let mut f = tcp_frame(&s, &[k as u8; 4]);
        f.resize(60, 0xee);
        inputs.push(f);
    }
    let outs = plan_single(&inputs, ChecksumTrust::Derive);
    assert_eq!(
        outs.iter().map(|o| o.segments).collect::<Vec<_>>(),
        vec![3, 1]
    );
    let m = &outs[0].bytes;
    assert_eq!(m.len(), L4 + 20 + 12, "padding dropped");
    let t = tcp::Packet::new_checked(&m[L4..]).unwrap();
    assert_eq!(t.flags(), tcp::flags::ACK | tcp::flags::PSH);
    assert_eq!(u16::from_be_bytes([m[L4 + 14], m[L4 + 15]]), 502);
    assert_eq!(tcp_verifies(m), Some(true));
}

/// Each rule that keeps a segment out of its predecessor's merge.
#[test]
fn segments_that_must_not_merge() {
    let base = Seg::default();
    let second = |f: &dyn Fn(&mut Seg)| {
        let mut s = Seg {
            seq: base.seq + 100,
            ..base.clone()
        };
        f(&mut s);
        s
    };
    let cases: Vec<(&str, Seg)> = vec![
        ("gap", second(&|s| s.seq += 1)),
        ("ack", second(&|s| s.ack += 1)),
        ("syn", second(&|s| s.flags |= tcp::flags::SYN)),
        ("fin", second(&|s| s.flags |= tcp::flags::FIN)),
        ("rst", second(&|s| s.flags |= tcp::flags::RST)),
        ("urg", second(&|s| s.flags |= tcp::flags::URG)),
        ("cwr", second(&|s| s.flags |= tcp::flags::CWR)),
        ("ece", second(&|s| s.flags |= tcp::flags::ECE)),
        ("tos", second(&|s| s.tos = 4)),
        ("ttl", second(&|s| s.ttl = 63)),
        ("df", second(&|s| s.df = false)),
        ("options", second(&|s| s.options = ts_option(1, 1))),
        ("flow", second(&|s| s.sport += 1)),
        ("checksum kind", second(&|s| s.partial = true)),
        ("ip options", second(&|s| s.ip_options = vec![1; 4])),
    ];
    for (what, s2) in cases {
        let inputs = [tcp_frame(&base, &[1; 100]), tcp_frame(&s2, &[2; 100])];
        let outs = plan_single(&inputs, ChecksumTrust::Derive);
        assert_eq!(outs.len(), 2, "{what} merged");
    }
    // Larger than the first segment's payload; a pure ACK; not TCP.
    let big = tcp_frame(
        &Seg {
            seq: 1100,
            ..base.clone()
        },
        &[2; 101],
    );
    let ack = tcp_frame(
        &Seg {
            seq: 1100,
            ..base.clone()
        },
        &[],
    );
    let udp = udp_frame(&base, &[3; 100]);
    for (what, f) in [("bigger", big), ("pure ack", ack), ("udp", udp)] {
        let inputs = [tcp_frame(&base, &[1; 100]), f];
        assert_eq!(
            plan_single(&inputs, ChecksumTrust::Derive).len(),
            2,
            "{what} merged"
        );
    }
}

/// A frame whose headers continue past its first buffer could be of any flow: the merge before
/// it ends, so the segments after it are not moved in front of it (found by the property test).
#[test]
fn frame_of_unknown_flow_closes_open_merges() {
    let inputs = bulk(3, 1000, &Seg::default());
    let mut b = Batch::default();
    b.push(&inputs[0], inputs[0].len(), 1);
    b.push(&inputs[1], 40, 1000);
    b.push(&inputs[2], inputs[2].len(), 1);
    let outs = b.coalesce(ChecksumTrust::Derive);
    check_plan(&inputs, &outs);
    assert_eq!(outs.len(), 3);
}

/// A corrupt segment: Derive merges it into a packet that fails verification; Verify keeps it
/// out.
#[test]
fn corrupt_segment_never_yields_a_valid_looking_merge() {
    let mut inputs = bulk(4, 1000, &Seg::default());
    inputs[2][L4 + 20 + 7] ^= 0x10;
    let outs = plan_single(&inputs, ChecksumTrust::Derive);
    assert_eq!(outs.len(), 1);
    assert_eq!(tcp_verifies(&outs[0].bytes), Some(false));
    let outs = plan_single(&inputs, ChecksumTrust::Verify);
    let sizes: Vec<usize> = outs.iter().map(|o| o.segments).collect();
    assert_eq!(sizes, vec![2, 1, 1]);
    assert_eq!(tcp_verifies(&outs[0].bytes), Some(true));
}

/// One generated segment: its flow (0..4) and what happens to it.
#[derive(Clone, Debug)]
struct Ev {
    flow: usize,
    len: usize,
    what: u8,
    head: usize,
    chunk: usize,
}

fn ev() -> impl Strategy<Value = Ev> {
    (
        0usize..4,
        0usize..1500,
        0u8..100,
        40usize..2000,
        1usize..1600,
    )
        .prop_map(|(flow, len, what, head, chunk)| Ev {
            flow,
            len,
            what,
            head,
            chunk,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Random batches of four interleaved flows with gaps, flags, ACK and option changes, pure
    /// ACKs, corrupt segments, and random buffer splits: the plan never merges across flows, gaps
    /// or flags, keeps every flow's byte stream and order, and the merged checksum verifies
    /// whenever its members' did (and, under Derive, fails when one member's did not).
    #[test]
    fn random_batches_keep_streams(evs in proptest::collection::vec(ev(), 1..64),
                                   partial in any::<[bool; 4]>(), verify in any::<bool>()) {
        let mss = [1448usize, 1398, 536, 8948];
        let mut flows: Vec<Seg> = (0..4)
            .map(|i| Seg {
                sport: 40000 + i as u16,
                seq: (i as u32).wrapping_mul(0x9000_0000),
                partial: partial[i],
                options: if i % 2 == 1 { ts_option(5, 6) } else { vec![] },
                ..Seg::default()
            })
            .collect();
        let mut inputs = Vec::new();
        let mut corrupt = Vec::new();
        let mut b = Batch::default();
        for e in &evs {
            let fl = &mut flows[e.flow];
            let mut len = if e.what < 60 { mss[e.flow] } else { e.len.min(mss[e.flow]) };
            let mut s = fl.clone();
            match e.what {
                70..=74 => s.seq = s.seq.wrapping_add(1 + e.len as u32),
                75..=81 => s.flags |= [tcp::flags::PSH, tcp::flags::FIN, tcp::flags::SYN,
                    tcp::flags::RST, tcp::flags::URG, tcp::flags::CWR, tcp::flags::ECE][usize::from(e.what - 75)],
                82..=85 => fl.ack = fl.ack.wrapping_add(1 + e.len as u32),
                86..=88 => fl.options = if fl.options.is_empty() { ts_option(1, 2) } else { vec![] },
                89..=90 => s.ttl = 1,
                91..=95 => len = 0,
                _ => {}
            }
            s.ack = fl.ack;
            s.options = fl.options.clone();
            let mut f = tcp_frame(&s, &pattern(len, e.what));
            let bad = (96..=99).contains(&e.what) && len > 0 && !s.partial;
            if bad {
                let at = f.len() - 1 - e.len % len;
                f[at] ^= 0x5a;
            }
            fl.seq = s.seq.wrapping_add(len as u32);
            if f.len() < 60 {
                f.resize(60, 0);
            }
            b.push(&f, e.head, e.chunk);
            corrupt.push(bad);
            inputs.push(f);
        }
        let trust = if verify { ChecksumTrust::Verify } else { ChecksumTrust::Derive };
        let outs = b.coalesce(trust);
        check_plan(&inputs, &outs);
        for o in &outs {
            let partial_in = tcp_verifies(&inputs[o.members[0]]).is_none();
            let bad = o.members.iter().filter(|&&i| corrupt[i]).count();
            if o.segments > 1 {
                if verify { prop_assert_eq!(bad, 0); }
                let v = tcp_verifies(&o.bytes);
                match (partial_in, bad) {
                    (true, _) => prop_assert_eq!(v, None),
                    (false, 0) => prop_assert_eq!(v, Some(true)),
                    (false, 1) => prop_assert_eq!(v, Some(false)),
                    _ => {}
                }
            } else {
                prop_assert_eq!(&o.bytes[..], &inputs[o.members[0]][..]);
            }
        }
    }
}

/// The inner frames of a bulk TCP transfer over a kernel Flannel node
/// (`scripts/capture-gso-golden.sh`), decapsulated, in batches of 64.
fn kernel_inner_frames() -> Vec<Vec<u8>> {
    let frames = pcap::read_frames(include_bytes!("../../testdata/gro-vxlan-kernel.pcap")).unwrap();
    frames
        .into_iter()
        .map(|mut outer| {
            let n = outer.len();
            let mut f = Frame::new(&mut outer, 0, n);
            vxlan::decap(&mut f, vxlan::FLANNEL_VNI).unwrap();
            f.head().to_vec()
        })
        .collect()
}

/// Complete a partial TCP checksum in place (what the pipeline does to frames it forwards).
fn complete(f: &mut [u8]) {
    let ip = ipv4::Packet::new_checked(&f[L3..]).unwrap();
    let (s, d, len) = (ip.src(), ip.dst(), usize::from(ip.total_len()) - 20);
    f[L4 + 16..L4 + 18].copy_from_slice(&[0, 0]);
    let mut c = Checksum::new();
    c.add_u32(checksum::pseudo_header_sum(s, d, proto::TCP, len as u16));
    c.add_bytes(&f[L4..L4 + len]);
    let v = c.finish();
    f[L4 + 16..L4 + 18].copy_from_slice(&v.to_be_bytes());
}

#[test]
fn kernel_flannel_frames_coalesce() {
    let inner = kernel_inner_frames();
    assert!(inner.len() >= 100, "{} frames", inner.len());
    let data = inner.iter().filter(|f| tcp_of(f).3.len() == 1398).count();
    assert!(data >= 90, "{data} full-sized data segments");
    // As captured: partial checksums merge into a partial one; completed, it must verify.
    for trust in [ChecksumTrust::Derive, ChecksumTrust::Verify] {
        for (as_captured, want_partial) in [(true, true), (false, false)] {
            let mut merged_segments = 0;
            for batch in inner.chunks(64) {
                let mut inputs = batch.to_vec();
                if !as_captured {
                    inputs
                        .iter_mut()
                        .filter(|f| !tcp_of(f).3.is_empty())
                        .for_each(|f| complete(f));
                }
                assert!(
                    inputs.iter().all(
                        |f| tcp_of(f).3.is_empty() || tcp_verifies(f).is_none() == want_partial
                    )
                );
                let outs = plan_single(&inputs, trust);
                for o in outs.iter().filter(|o| o.segments > 1) {
                    merged_segments += o.segments;
                    let mut m = o.bytes.clone();
                    if want_partial {
                        assert_eq!(tcp_verifies(&m), None);
                        complete(&mut m);
                    }
                    assert_eq!(tcp_verifies(&m), Some(true));
                }
            }
            assert!(merged_segments >= 90, "{merged_segments} segments merged");
        }
    }
}
