//! Tests of software TSO, fragmentation and the ICMP answer; the frame builders here serve the
//! coalescer's tests too.

use super::*;
use crate::checksum::Checksum;
use crate::wire::ethernet::Mac;
use crate::wire::udp;
use proptest::prelude::*;

pub(crate) const SRC: [u8; 4] = [10, 244, 1, 2];
pub(crate) const DST: [u8; 4] = [10, 244, 2, 3];
const SRC_MAC: [u8; 6] = [0x0e, 0, 0, 0, 1, 0];
const DST_MAC: [u8; 6] = [0x0e, 0, 0, 0, 2, 0];

/// A TCP segment to build.
#[derive(Clone, Debug)]
pub(crate) struct Seg {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    pub urg_ptr: u16,
    /// TCP options (a multiple of 4 bytes).
    pub options: Vec<u8>,
    /// IPv4 options (a multiple of 4 bytes).
    pub ip_options: Vec<u8>,
    pub ident: u16,
    pub tos: u8,
    pub ttl: u8,
    pub df: bool,
    /// Leave the TCP checksum partial (the folded pseudo-header sum), as veth delivers it.
    pub partial: bool,
}

impl Default for Seg {
    fn default() -> Self {
        Self {
            src: SRC,
            dst: DST,
            sport: 40000,
            dport: 8080,
            seq: 1000,
            ack: 77,
            flags: tcp::flags::ACK,
            window: 502,
            urg_ptr: 0,
            options: vec![],
            ip_options: vec![],
            ident: 0x1234,
            tos: 0,
            ttl: 64,
            df: true,
            partial: false,
        }
    }
}

/// Timestamps option as Linux sends it (NOP, NOP, TS).
pub(crate) fn ts_option(val: u32, ecr: u32) -> Vec<u8> {
    let mut o = vec![1, 1, 8, 10];
    o.extend_from_slice(&val.to_be_bytes());
    o.extend_from_slice(&ecr.to_be_bytes());
    o
}

/// Ethernet + IPv4 + `l4`, protocol `proto`, with the header fields of `s`.
pub(crate) fn ip_frame(s: &Seg, protocol: u8, l4: &[u8]) -> Vec<u8> {
    let ip_hl = ipv4::MIN_HEADER_LEN + s.ip_options.len();
    let mut f = vec![0u8; L3 + ip_hl];
    ethernet::Repr {
        dst: Mac(DST_MAC),
        src: Mac(SRC_MAC),
        ethertype: ethernet::ethertype::IPV4,
    }
    .emit(&mut f)
    .unwrap();
    ipv4::Repr {
        src: s.src,
        dst: s.dst,
        protocol,
        tos: s.tos,
        ident: s.ident,
        dont_frag: s.df,
        ttl: s.ttl,
        payload_len: (s.ip_options.len() + l4.len()) as u16,
    }
    .emit(&mut f[L3..])
    .unwrap();
    f[L3] = 0x40 | (ip_hl / 4) as u8;
    f[L3 + 20..].copy_from_slice(&s.ip_options);
    ipv4::Packet::new_checked(&mut f[L3..])
        .unwrap()
        .fill_checksum();
    f.extend_from_slice(l4);
    f
}

/// A TCP frame with `payload` and a complete (or, with `s.partial`, partial) checksum.
pub(crate) fn tcp_frame(s: &Seg, payload: &[u8]) -> Vec<u8> {
    let hl = tcp::MIN_HEADER_LEN + s.options.len();
    let mut l4 = vec![0u8; hl];
    l4[0..2].copy_from_slice(&s.sport.to_be_bytes());
    l4[2..4].copy_from_slice(&s.dport.to_be_bytes());
    l4[4..8].copy_from_slice(&s.seq.to_be_bytes());
    l4[8..12].copy_from_slice(&s.ack.to_be_bytes());
    l4[12] = ((hl / 4) as u8) << 4;
    l4[13] = s.flags;
    l4[14..16].copy_from_slice(&s.window.to_be_bytes());
    l4[18..20].copy_from_slice(&s.urg_ptr.to_be_bytes());
    l4[20..].copy_from_slice(&s.options);
    l4.extend_from_slice(payload);
    let len = l4.len() as u16;
    let c = if s.partial {
        checksum::pseudo_header_folded(s.src, s.dst, proto::TCP, len)
    } else {
        let mut c = Checksum::new();
        c.add_u32(checksum::pseudo_header_sum(s.src, s.dst, proto::TCP, len));
        c.add_bytes(&l4);
        c.finish()
    };
    l4[16..18].copy_from_slice(&c.to_be_bytes());
    ip_frame(s, proto::TCP, &l4)
}

/// A UDP frame (checksum 0) with `payload`.
pub(crate) fn udp_frame(s: &Seg, payload: &[u8]) -> Vec<u8> {
    let mut l4 = vec![0u8; udp::HEADER_LEN];
    udp::Repr {
        src_port: s.sport,
        dst_port: s.dport,
        payload_len: payload.len() as u16,
        checksum: 0,
    }
    .emit(&mut l4)
    .unwrap();
    l4.extend_from_slice(payload);
    ip_frame(s, proto::UDP, &l4)
}

/// `n` bytes of a pattern that differs from byte to byte and from stream to stream.
pub(crate) fn pattern(n: usize, salt: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt) ^ (i >> 8) as u8)
        .collect()
}

/// A frame cut into buffers as AF_XDP multi-buffer delivers it: `head` bytes in the first
/// buffer (behind `headroom` spare bytes), the rest in tail buffers of `chunk` bytes.
pub(crate) struct Chained {
    pub head: Vec<u8>,
    pub headroom: usize,
    pub head_len: usize,
    pub tail: Vec<Vec<u8>>,
}

impl Chained {
    pub fn new(bytes: &[u8], headroom: usize, head: usize, chunk: usize) -> Self {
        let head = head.min(bytes.len());
        let mut buf = vec![0u8; headroom + head];
        buf[headroom..].copy_from_slice(&bytes[..head]);
        Self {
            head: buf,
            headroom,
            head_len: head,
            tail: bytes[head..]
                .chunks(chunk.max(1))
                .map(<[u8]>::to_vec)
                .collect(),
        }
    }
}

/// Run `f` on the frame over `c`'s buffers.
pub(crate) fn with_frame<R>(c: &mut Chained, f: impl FnOnce(&mut Frame<'_>) -> R) -> R {
    let tails: Vec<&[u8]> = c.tail.iter().map(Vec::as_slice).collect();
    let mut frame = Frame::new(&mut c.head, c.headroom, c.head_len).with_tail(&tails);
    f(&mut frame)
}

/// Every piece of `frame` for `max_ip_len`, each written into a first buffer of `out_head`
/// bytes (headers at `START`) and tail buffers of `out_chunk` bytes, as contiguous frames.
const START: usize = vxlan::OVERHEAD + 6;

fn cut(frame: &Frame<'_>, max_ip_len: usize, out_head: usize, out_chunk: usize) -> Vec<Vec<u8>> {
    let Ok(Oversize::Split(mut seg)) = plan(frame, max_ip_len) else {
        panic!("not split");
    };
    let count = seg.count();
    let mut out = Vec::new();
    while !seg.is_done() {
        let need = seg.next_len().unwrap();
        let mut head = vec![0xeeu8; START + out_head];
        let spill = need.saturating_sub(out_head);
        let mut tails: Vec<Vec<u8>> = vec![vec![0xee; out_chunk]; spill.div_ceil(out_chunk)];
        let mut tail_refs: Vec<&mut [u8]> = tails.iter_mut().map(Vec::as_mut_slice).collect();
        let w = seg.write_next(&mut head, START, &mut tail_refs).unwrap();
        assert_eq!(w.len, need);
        let mut bytes = head[START..START + w.head_len].to_vec();
        for (i, t) in tails.iter().take(w.tail_bufs).enumerate() {
            let n = if i + 1 == w.tail_bufs {
                w.last_tail_len
            } else {
                t.len()
            };
            bytes.extend_from_slice(&t[..n]);
        }
        assert_eq!(bytes.len(), w.len);
        out.push(bytes);
    }
    assert_eq!(out.len(), count);
    assert_eq!(
        seg.write_next(&mut [0; 4096], 0, &mut []),
        Err(SegmentError::Done)
    );
    out
}

fn tcp_verifies(f: &[u8]) -> bool {
    let ip = ipv4::Packet::new_checked(&f[L3..]).unwrap();
    let l4 = &f[L3 + ip.header_len()..L3 + usize::from(ip.total_len())];
    let mut c = Checksum::new();
    c.add_u32(checksum::pseudo_header_sum(
        ip.src(),
        ip.dst(),
        proto::TCP,
        l4.len() as u16,
    ));
    c.add_bytes(l4);
    c.fold() == 0xffff
}

/// Check the TSO rules on the segments of `orig` (a contiguous frame) for `max_ip_len`.
fn check_segments(orig: &[u8], segs: &[Vec<u8>], max_ip_len: usize) {
    let oip = ipv4::Packet::new_checked(&orig[L3..]).unwrap();
    let ip_hl = oip.header_len();
    let ot = tcp::Packet::new_checked(&orig[L3 + ip_hl..]).unwrap();
    let tcp_hl = ot.header_len();
    let hdr = L3 + ip_hl + tcp_hl;
    let payload = &orig[hdr..L3 + usize::from(oip.total_len())];
    let mss = max_ip_len - ip_hl - tcp_hl;
    assert_eq!(segs.len(), payload.len().div_ceil(mss));
    let mut stream = Vec::new();
    let oflags = ot.flags();
    for (i, s) in segs.iter().enumerate() {
        let last = i + 1 == segs.len();
        let ip = ipv4::Packet::new_checked(&s[L3..]).unwrap();
        assert!(ip.verify_checksum(), "segment {i}: IP checksum");
        assert!(tcp_verifies(s), "segment {i}: TCP checksum");
        let ip_len = usize::from(ip.total_len());
        assert_eq!(L3 + ip_len, s.len());
        assert!(ip_len <= max_ip_len, "segment {i} too big");
        let body = &s[hdr..];
        if !last {
            assert_eq!(body.len(), mss);
        }
        assert_eq!(ip.ident(), oip.ident().wrapping_add(i as u16));
        let t = tcp::Packet::new_checked(&s[L3 + ip_hl..]).unwrap();
        assert_eq!(t.seq(), ot.seq().wrapping_add(stream.len() as u32));
        let mut want = oflags;
        if i > 0 {
            want &= !tcp::flags::CWR;
        }
        if !last {
            want &= !(tcp::flags::FIN | tcp::flags::PSH);
        }
        let ourg = usize::from(u16::from_be_bytes([
            orig[hdr - tcp_hl + 18],
            orig[hdr - tcp_hl + 19],
        ]));
        let urg_ptr = u16::from_be_bytes([s[hdr - tcp_hl + 18], s[hdr - tcp_hl + 19]]);
        if oflags & tcp::flags::URG != 0 && ourg > stream.len() {
            assert_eq!(usize::from(urg_ptr), ourg - stream.len());
        } else {
            want &= !tcp::flags::URG;
            assert!(oflags & tcp::flags::URG == 0 || urg_ptr == 0);
        }
        assert_eq!(t.flags(), want, "segment {i} flags");
        // Everything else is the original's.
        let same = |r: core::ops::Range<usize>| assert_eq!(&s[r.clone()], &orig[r], "segment {i}");
        same(0..L3 + 2);
        same(L3 + 6..L3 + 10);
        same(L3 + 12..L3 + ip_hl + 4);
        same(L3 + ip_hl + 8..L3 + ip_hl + 13);
        same(L3 + ip_hl + 14..L3 + ip_hl + 16);
        same(L3 + ip_hl + 20..hdr);
        stream.extend_from_slice(body);
    }
    assert_eq!(stream, payload);
}

fn tcp_flags_strategy() -> impl Strategy<Value = u8> {
    // ACK always; any of CWR, ECE, URG, PSH, FIN.
    (0u8..32).prop_map(|b| {
        tcp::flags::ACK
            | if b & 1 != 0 { tcp::flags::CWR } else { 0 }
            | if b & 2 != 0 { tcp::flags::ECE } else { 0 }
            | if b & 4 != 0 { tcp::flags::URG } else { 0 }
            | if b & 8 != 0 { tcp::flags::PSH } else { 0 }
            | if b & 16 != 0 { tcp::flags::FIN } else { 0 }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Segments of any TCP frame, any MSS, any input and output buffer split: the byte stream
    /// reassembles, every checksum verifies, every segment fits, flag, sequence and ID rules hold.
    #[test]
    fn tso_segments_reassemble_and_verify(
        payload_len in 1usize..65_400,
        max_ip_len in 68usize..9_100,
        opt_words in 0usize..=10,
        ip_opt_words in 0usize..=3,
        flags in tcp_flags_strategy(),
        urg_ptr in any::<u16>(),
        seq in any::<u32>(),
        ident in any::<u16>(),
        partial in any::<bool>(),
        head_extra in 0usize..5000,
        chunk in 1usize..5000,
        out_head in 0usize..9100,
        out_chunk in 1usize..5000,
    ) {
        let seg = Seg {
            seq,
            ident,
            flags,
            urg_ptr,
            partial,
            options: (0..opt_words * 4).map(|i| if i % 4 == 3 { 0 } else { 1 }).collect(),
            ip_options: vec![1; ip_opt_words * 4],
            ..Seg::default()
        };
        let ip_len = 20 + seg.ip_options.len() + 20 + seg.options.len() + payload_len;
        prop_assume!(ip_len <= 65_535);
        let hdr = L3 + ip_len - payload_len;
        prop_assume!(max_ip_len > ip_len - payload_len);
        let orig = tcp_frame(&seg, &pattern(payload_len, seq as u8));
        let mut c = Chained::new(&orig, 0, hdr + head_extra, chunk);
        let out_head = out_head.max(hdr + 1);
        let segs = with_frame(&mut c, |f| {
            if ip_len <= max_ip_len {
                assert!(matches!(plan(f, max_ip_len), Ok(Oversize::Fits)));
                return None;
            }
            Some(cut(f, max_ip_len, out_head, out_chunk))
        });
        if let Some(segs) = segs {
            check_segments(&orig, &segs, max_ip_len);
        }
    }

    /// IPv4 fragments of a DF-clear datagram: offsets in 8-byte units, MF on all but the last,
    /// each header checksum valid, each fits, and they reassemble to the original's payload.
    #[test]
    fn fragments_reassemble(
        payload_len in 1usize..20_000,
        max_ip_len in 68usize..4_000,
        head_extra in 0usize..3000,
        chunk in 1usize..3000,
    ) {
        let s = Seg { df: false, ..Seg::default() };
        let orig = udp_frame(&s, &pattern(payload_len, 7));
        let ip_len = orig.len() - L3;
        prop_assume!(ip_len > max_ip_len);
        let mut c = Chained::new(&orig, 0, L3 + 20 + head_extra, chunk);
        let frags = with_frame(&mut c, |f| cut(f, max_ip_len, 1600, 1024));
        let mut data = Vec::new();
        for (i, fr) in frags.iter().enumerate() {
            let ip = ipv4::Packet::new_checked(&fr[L3..]).unwrap();
            prop_assert!(ip.verify_checksum());
            prop_assert!(usize::from(ip.total_len()) <= max_ip_len);
            prop_assert_eq!(usize::from(ip.frag_offset()), data.len());
            prop_assert_eq!(ip.more_frags(), i + 1 < frags.len());
            prop_assert_eq!(ip.ident(), s.ident);
            prop_assert!(!ip.dont_frag());
            let body = &fr[L3 + 20..];
            if i + 1 < frags.len() {
                prop_assert_eq!(body.len() % 8, 0);
            }
            data.extend_from_slice(body);
        }
        prop_assert_eq!(&data[..], &orig[L3 + 20..]);
    }
}

#[test]
fn output_too_small_writes_nothing_and_can_be_retried() {
    let orig = tcp_frame(&Seg::default(), &pattern(4000, 1));
    let mut c = Chained::new(&orig, 0, orig.len(), 1);
    with_frame(&mut c, |f| {
        let Ok(Oversize::Split(mut seg)) = plan(f, 1450) else {
            panic!()
        };
        assert_eq!((seg.count(), seg.max_frame_len()), (3, 1464));
        let mut small = [0u8; 1000];
        assert_eq!(
            seg.write_next(&mut small, 0, &mut []),
            Err(SegmentError::OutputTooSmall)
        );
        assert_eq!(small, [0u8; 1000]);
        let mut more = [0u8; 500];
        let w = seg
            .write_next(&mut small, 10, &mut [&mut more[..]])
            .unwrap();
        assert_eq!(
            w,
            Written {
                len: 1464,
                head_len: 990,
                tail_bufs: 1,
                last_tail_len: 474
            }
        );
        assert_eq!(seg.next_len(), Some(1464));
    });
}

#[test]
fn small_frames_fit_and_bad_ones_are_refused() {
    let orig = tcp_frame(&Seg::default(), &pattern(100, 1));
    let mut c = Chained::new(&orig, 0, orig.len(), 1);
    with_frame(&mut c, |f| {
        assert!(matches!(plan(f, 1450), Ok(Oversize::Fits)));
        assert!(matches!(plan(f, 60), Err(SegmentError::MtuTooSmall)));
    });
    let mut arp = orig.clone();
    arp[12..14].copy_from_slice(&[8, 6]);
    let mut c = Chained::new(&arp, 0, arp.len(), 1);
    with_frame(&mut c, |f| {
        assert!(matches!(plan(f, 68), Err(SegmentError::NotIpv4)))
    });
    // The TCP header continues in the tail buffer.
    let mut c = Chained::new(&orig, 0, L3 + 30, 1000);
    with_frame(&mut c, |f| {
        assert!(matches!(plan(f, 68), Err(SegmentError::HeadersSplit)))
    });
    // A total length beyond the frame.
    let mut c = Chained::new(&orig[..orig.len() - 1], 0, 2000, 1);
    with_frame(&mut c, |f| {
        assert!(matches!(plan(f, 68), Err(SegmentError::Malformed)))
    });
}

/// A DF-set UDP datagram is answered with "fragmentation needed" quoting it; DF-set TCP SYNs
/// too (TSO never cuts them).
#[test]
fn df_set_non_tcp_gets_frag_needed() {
    let s = Seg::default();
    let orig = udp_frame(&s, &pattern(3000, 3));
    let mut c = Chained::new(&orig, 0, 1000, 700);
    let mut out = [0u8; 700];
    let n = with_frame(&mut c, |f| {
        let Ok(Oversize::FragNeeded { mtu }) = plan(f, 1450) else {
            panic!()
        };
        assert_eq!(mtu, 1450);
        frag_needed(f, mtu, [10, 244, 1, 0], 9, &mut out).unwrap()
    });
    assert_eq!(n, L3 + ICMP_ERROR_MAX);
    let m = &out[..n];
    assert_eq!((&m[..6], &m[6..12]), (&SRC_MAC[..], &DST_MAC[..]));
    let ip = ipv4::Packet::new_checked(&m[L3..]).unwrap();
    assert!(ip.verify_checksum());
    assert_eq!(
        (ip.src(), ip.dst(), ip.protocol()),
        ([10, 244, 1, 0], SRC, proto::ICMP)
    );
    assert_eq!(
        (ip.ident(), ip.ttl(), ip.tos(), ip.dont_frag()),
        (9, 64, 0xc0, false)
    );
    assert_eq!(usize::from(ip.total_len()), ICMP_ERROR_MAX);
    let icmp_msg = &m[L3 + 20..];
    assert_eq!(checksum::checksum(icmp_msg), 0);
    let p = icmp::Packet::new_checked(icmp_msg).unwrap();
    assert_eq!((p.msg_type(), p.code(), p.next_hop_mtu()), (3, 4, 1450));
    assert_eq!(p.data(), &orig[L3..L3 + ICMP_ERROR_MAX - 28]);

    let syn = tcp_frame(
        &Seg {
            flags: tcp::flags::SYN,
            ..Seg::default()
        },
        &pattern(2000, 1),
    );
    let mut c = Chained::new(&syn, 0, syn.len(), 1);
    with_frame(&mut c, |f| {
        assert!(matches!(
            plan(f, 1450),
            Ok(Oversize::FragNeeded { mtu: 1450 })
        ));
        // A short datagram is quoted whole.
        let mut out = [0u8; 100];
        assert_eq!(
            frag_needed(f, 1450, [1, 1, 1, 1], 1, &mut out),
            Err(SegmentError::OutputTooSmall)
        );
    });
}

#[test]
fn no_icmp_about_icmp_errors_or_from_odd_sources() {
    let about = udp_frame(&Seg::default(), &[0; 8]);
    let mut err = about.clone();
    err.truncate(L3 + 28);
    let mut l4 = vec![3u8, 1, 0, 0, 0, 0, 0, 0];
    l4.extend_from_slice(&about[L3..L3 + 28]);
    l4.extend_from_slice(&pattern(2000, 0));
    let icmp_err = ip_frame(&Seg::default(), proto::ICMP, &l4);
    let bcast = udp_frame(
        &Seg {
            src: [255, 255, 255, 255],
            ..Seg::default()
        },
        &[0; 2000],
    );
    for f in [icmp_err, bcast] {
        let mut c = Chained::new(&f, 0, f.len(), 1);
        let mut out = [0u8; 1000];
        with_frame(&mut c, |fr| {
            assert_eq!(
                frag_needed(fr, 1450, [1, 1, 1, 1], 1, &mut out),
                Err(SegmentError::NoIcmp)
            )
        });
    }
}

/// Options without the copied bit become NOPs in later fragments; copied ones stay.
#[test]
fn later_fragments_keep_only_copied_options() {
    // Record route (7, not copied, 7 bytes) + NOP; loose source route (0x83, copied, 7 bytes) + EOL.
    let opts = vec![7, 7, 4, 0, 0, 0, 0, 1, 0x83, 7, 4, 1, 2, 3, 4, 0];
    let s = Seg {
        df: false,
        ip_options: opts.clone(),
        ..Seg::default()
    };
    let orig = udp_frame(&s, &pattern(3000, 5));
    let mut c = Chained::new(&orig, 0, orig.len(), 1);
    let frags = with_frame(&mut c, |f| cut(f, 1500, 1600, 100));
    assert_eq!(frags.len(), 3);
    assert_eq!(&frags[0][L3 + 20..L3 + 36], &opts[..]);
    let later = [1, 1, 1, 1, 1, 1, 1, 1, 0x83, 7, 4, 1, 2, 3, 4, 0];
    for f in &frags[1..] {
        assert_eq!(&f[L3 + 20..L3 + 36], &later[..]);
        assert!(
            ipv4::Packet::new_checked(&f[L3..])
                .unwrap()
                .verify_checksum()
        );
    }
}

/// Every segment goes into VXLAN with the outer source port `route::forward` gives the flow.
#[test]
fn flow_tunnel_gives_every_segment_the_flows_source_port() {
    let orig = tcp_frame(&Seg::default(), &pattern(5000, 2));
    let mut c = Chained::new(&orig, 0, orig.len(), 1);
    let tunnel = Tunnel {
        src_mac: Mac([2, 0, 0, 0, 0, 1]),
        dst_mac: Mac([2, 0, 0, 0, 0, 2]),
        src_ip: [192, 168, 50, 1],
        dst_ip: [192, 168, 50, 2],
        vni: vxlan::FLANNEL_VNI,
        dst_port: vxlan::FLANNEL_PORT,
    };
    let key = FlowKey {
        src: SRC,
        dst: DST,
        src_port: 40000,
        dst_port: 8080,
        proto: proto::TCP,
    };
    with_frame(&mut c, |f| {
        let Ok(Oversize::Split(mut seg)) = plan(f, 1450) else {
            panic!()
        };
        assert_eq!(seg.flow_key(), key);
        let tun = FlowTunnel::new(tunnel, seg.flow_key());
        assert_eq!(tun.src_port(), vxlan::src_port(key.hash64()));
        let mut id = 100;
        while !seg.is_done() {
            let mut chunk = vec![0u8; 2048];
            let w = seg.write_next(&mut chunk, 64, &mut []).unwrap();
            let mut out = Frame::new(&mut chunk, 64, w.head_len);
            tun.encap(&mut out, id).unwrap();
            let h = out.head();
            assert!(h.len() <= 1500 + L3);
            assert_eq!(u16::from_be_bytes([h[34], h[35]]), tun.src_port());
            assert_eq!(u16::from_be_bytes([h[18], h[19]]), id);
            id += 1;
        }
    });
}

/// The kernel's own GSO (`scripts/capture-gso-golden.sh`) cut three known super-packets; ours must
/// cut them into the same frames byte for byte, every field included: Ethernet and IPv4 headers
/// (identification incrementing from the original's, as Linux's `inet_gso_segment` does without
/// SKB_GSO_TCP_FIXEDID, wrapping after 0xffff), TCP headers (sequence numbers wrapping, CWR on the
/// first only, FIN and PSH on the last only, ECE on all), payload, and both checksums (the
/// super-packets carry partial checksums; the kernel computed complete ones in software, its
/// veth having tx checksumming off). The super-packets are cut as AF_XDP delivers them, in
/// 4 KiB chunks, and written into 4 KiB chunks.
#[test]
fn segments_match_kernel_gso_byte_for_byte() {
    let supers = crate::pcap::read_frames(include_bytes!("../../testdata/gso-super.pcap")).unwrap();
    let kernel =
        crate::pcap::read_frames(include_bytes!("../../testdata/gso-kernel.pcap")).unwrap();
    let mss = [1448, 1000, 1398];
    assert_eq!(supers.len(), mss.len());
    let mut k = kernel.iter();
    for (n, (sp, mss)) in supers.iter().zip(mss).enumerate() {
        let tcp_hl = usize::from(sp[L3 + 20 + 12] >> 4) * 4;
        let mut c = Chained::new(sp, 256, 4096 - 256, 4096);
        let ours = with_frame(&mut c, |f| cut(f, 20 + tcp_hl + mss, 4096 - START, 4096));
        for (i, seg) in ours.iter().enumerate() {
            let theirs = k.next().expect("kernel made fewer segments");
            assert_eq!(seg, theirs, "super-packet {n}, segment {i}");
        }
    }
    assert_eq!(k.next(), None, "kernel made more segments");
    assert_eq!(kernel.len(), 14 + 8 + 47);
}
