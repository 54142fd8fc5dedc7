//! Stage `nat`: rewrite a packet's addresses and ports (service DNAT, NodePort SNAT, and the
//! reverse translation of replies) with incremental checksum updates (RFC 1624), and translate the
//! embedded header of ICMP errors about a translated flow. Touches only the first buffer.

use crate::checksum;
use crate::flow::FlowKey;
use crate::flow::proto;
use crate::frame::Frame;
use crate::parse::{IcmpKind, L3_OFFSET, Parsed};
use crate::wire::{get16, icmp, ipv4, set16, tcp, udp};

/// Rewrite the packet from its tuple to `to` (addresses, ports or echo id), updating the IPv4
/// header checksum and the L4 checksum incrementally. `p` is updated to the new tuple.
pub fn rewrite(frame: &mut Frame<'_>, p: &mut Parsed, to: &FlowKey) {
    let head = frame.head_mut();
    let l4 = p.l4_off;
    if let Ok(mut ip) = ipv4::Packet::new_checked(&mut head[L3_OFFSET..]) {
        if p.src != to.src {
            ip.set_src(to.src);
        }
        if p.dst != to.dst {
            ip.set_dst(to.dst);
        }
    }
    match (p.proto, p.icmp) {
        (proto::TCP | proto::UDP, _) => {
            let udp = p.proto == proto::UDP;
            let co = l4
                + if udp {
                    udp::CHECKSUM_OFFSET
                } else {
                    tcp::CHECKSUM_OFFSET
                };
            let Some(mut c) = get16(head, co) else { return };
            if p.csum_partial {
                // The field is the pseudo-header sum, not complemented: addresses are in it, ports
                // are not (they are summed with the data when the checksum is completed).
                c = !c;
                for (old, new) in [(p.src, to.src), (p.dst, to.dst)] {
                    if old != new {
                        c = checksum::update32(c, old, new);
                    }
                }
                c = !c;
            } else {
                let upd32 = |c, o, n| {
                    if udp {
                        checksum::update_udp32(c, o, n)
                    } else {
                        checksum::update32(c, o, n)
                    }
                };
                let upd16 = |c, o, n| {
                    if udp {
                        checksum::update_udp16(c, o, n)
                    } else {
                        checksum::update16(c, o, n)
                    }
                };
                if p.src != to.src {
                    c = upd32(c, p.src, to.src);
                }
                if p.dst != to.dst {
                    c = upd32(c, p.dst, to.dst);
                }
                if p.src_port != to.src_port {
                    c = upd16(c, p.src_port, to.src_port);
                }
                if p.dst_port != to.dst_port {
                    c = upd16(c, p.dst_port, to.dst_port);
                }
            }
            if p.src_port != to.src_port {
                set16(head, l4, to.src_port);
            }
            if p.dst_port != to.dst_port {
                set16(head, l4 + 2, to.dst_port);
            }
            set16(head, co, c);
        }
        (proto::ICMP, IcmpKind::Echo) if p.src_port != to.src_port => {
            if let Some(b) = head.get_mut(l4..l4 + icmp::HEADER_LEN)
                && let Ok(mut m) = icmp::Packet::new_checked(b)
            {
                m.set_echo_id(to.src_port);
            }
        }
        _ => {}
    }
    p.src = to.src;
    p.dst = to.dst;
    p.src_port = to.src_port;
    p.dst_port = to.dst_port;
}

/// The tuple of the datagram embedded in an ICMP error (TCP/UDP ports, or an echo id).
pub fn embedded_tuple(frame: &Frame<'_>, p: &Parsed) -> Option<FlowKey> {
    let IcmpKind::Error { inner_off } = p.icmp else {
        return None;
    };
    let inner = frame.head().get(inner_off..)?;
    let ip = ipv4::Packet::new_checked(inner).ok()?;
    let l4 = inner.get(ip.header_len()..)?;
    let (sp, dp) = match ip.protocol() {
        proto::TCP | proto::UDP => (get16(l4, 0)?, get16(l4, 2)?),
        proto::ICMP => {
            let id = get16(l4, 4)?;
            (id, id)
        }
        _ => (0, 0),
    };
    Some(FlowKey {
        src: ip.src(),
        dst: ip.dst(),
        src_port: sp,
        dst_port: dp,
        proto: ip.protocol(),
    })
}

/// Translate an ICMP error: its embedded datagram from `from` to `to` (addresses, ports, echo id,
/// the embedded IPv4 checksum and, where present, the embedded L4 checksum), then the outer
/// addresses to `outer_src`/`outer_dst`, and recompute the ICMP checksum over the message.
pub fn rewrite_icmp_error(
    frame: &mut Frame<'_>,
    p: &mut Parsed,
    from: &FlowKey,
    to: &FlowKey,
    outer_src: [u8; 4],
    outer_dst: [u8; 4],
) {
    let IcmpKind::Error { inner_off } = p.icmp else {
        return;
    };
    let msg_end = (p.l4_off + p.l4_len).min(frame.len());
    {
        let head = frame.head_mut();
        let Some(inner) = head.get_mut(inner_off..msg_end) else {
            return;
        };
        let Ok(mut ip) = ipv4::Packet::new_checked(&mut *inner) else {
            return;
        };
        let hl = ip.header_len();
        if from.src != to.src {
            ip.set_src(to.src);
        }
        if from.dst != to.dst {
            ip.set_dst(to.dst);
        }
        let l4 = hl;
        match from.proto {
            proto::TCP | proto::UDP => {
                set16(inner, l4, to.src_port);
                set16(inner, l4 + 2, to.dst_port);
                let udp = from.proto == proto::UDP;
                let co = l4
                    + if udp {
                        udp::CHECKSUM_OFFSET
                    } else {
                        tcp::CHECKSUM_OFFSET
                    };
                if let Some(mut c) = get16(inner, co)
                    && !(udp && c == 0)
                {
                    c = checksum::update32(c, from.src, to.src);
                    c = checksum::update32(c, from.dst, to.dst);
                    c = checksum::update16(c, from.src_port, to.src_port);
                    c = checksum::update16(c, from.dst_port, to.dst_port);
                    set16(inner, co, if udp && c == 0 { 0xffff } else { c });
                }
            }
            proto::ICMP => {
                // The embedded echo's own checksum is usually cut off; fix it when present.
                if let Some(c) = get16(inner, l4 + 2)
                    && inner.len() >= l4 + 8
                {
                    set16(
                        inner,
                        l4 + 2,
                        checksum::update16(c, from.src_port, to.src_port),
                    );
                }
                set16(inner, l4 + 4, to.src_port);
            }
            _ => {}
        }
    }
    let outer = FlowKey {
        src: outer_src,
        dst: outer_dst,
        src_port: p.src_port,
        dst_port: p.dst_port,
        proto: p.proto,
    };
    rewrite(frame, p, &outer);
    // ICMP checksum over the whole message (it covers the embedded bytes we changed).
    let c = checksum::l4_full(frame, p.l4_off, p.l4_len, 2, 0);
    set16(frame.head_mut(), p.l4_off + 2, c);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::{ParseOutcome, parse, tests::tcp_syn};

    fn parsed(f: &mut [u8]) -> Parsed {
        let t = crate::tables::tests::demo_tables();
        let n = f.len();
        match parse(&t, &Frame::new(f, 0, n)) {
            ParseOutcome::Ipv4(p) => p,
            o => panic!("{o:?}"),
        }
    }

    fn l4_ok(f: &mut [u8]) -> bool {
        let p = parsed(f);
        let n = f.len();
        let fr = Frame::new(f, 0, n);
        let co = checksum::l4_checksum_offset(p.proto).unwrap_or(2);
        let pseudo = if p.proto == proto::ICMP {
            0
        } else {
            checksum::pseudo_header_sum(p.src, p.dst, p.proto, p.l4_len as u16)
        };
        let want = checksum::l4_full(&fr, p.l4_off, p.l4_len, co, pseudo);
        get16(fr.head(), p.l4_off + co) == Some(want)
    }

    #[test]
    fn dnat_keeps_checksums_valid() {
        let mut f = tcp_syn([10, 244, 1, 2], [10, 96, 0, 10], 40000, 80);
        assert!(l4_ok(&mut f));
        let mut p = parsed(&mut f);
        let mut to = p.key();
        to.dst = [10, 244, 2, 3];
        to.dst_port = 8080;
        to.src = [10, 244, 1, 0];
        to.src_port = 1234;
        let n = f.len();
        rewrite(&mut Frame::new(&mut f, 0, n), &mut p, &to);
        let q = parsed(&mut f);
        assert_eq!(q.key(), to);
        assert!(l4_ok(&mut f));
    }

    #[test]
    fn partial_checksum_is_completed() {
        let mut f = tcp_syn([10, 244, 1, 2], [10, 244, 2, 3], 40000, 80);
        let partial = checksum::pseudo_header_folded([10, 244, 1, 2], [10, 244, 2, 3], 6, 20);
        f[34 + 16..34 + 18].copy_from_slice(&partial.to_be_bytes());
        assert!(!l4_ok(&mut f));
        let p = parsed(&mut f);
        let n = f.len();
        assert!(checksum::complete_partial(
            &mut Frame::new(&mut f, 0, n),
            &p
        ));
        assert!(l4_ok(&mut f));
        // A complete one is left alone.
        assert!(!checksum::complete_partial(
            &mut Frame::new(&mut f, 0, n),
            &p
        ));
    }

    #[test]
    fn kernel_partial_frames_are_completed() {
        let frames =
            crate::pcap::read_frames(include_bytes!("../testdata/vxlan-kernel.pcap")).unwrap();
        for mut inner in frames
            .into_iter()
            .map(|f| f[crate::vxlan::OVERHEAD..].to_vec())
        {
            let p = parsed(&mut inner);
            let n = inner.len();
            checksum::complete_partial(&mut Frame::new(&mut inner, 0, n), &p);
            assert!(l4_ok(&mut inner));
        }
    }
}
