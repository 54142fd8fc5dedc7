//! Stage `parse`: validate a frame's headers and extract what later stages need.
//!
//! IPv4 headers are validated once, by etherparse (`Ipv4HeaderSlice`: version, header length, total
//! length); this stage adds what etherparse leaves to the caller: the IPv4 header checksum, the
//! total length against the frame, and the rule that every header lies in the frame's first
//! buffer. TCP, UDP and ICMP are read through the `wire` views. Later stages work from [`Parsed`]
//! and do not read these headers again. L4
//! checksums are not verified (the receiving pod does; partial ones are completed by `nat`).
//!
//! Not IPv4: ARP and other EtherTypes (VLAN tags included) go to the kernel; IPv6 is recognised
//! by its EtherType and passed or dropped as [`crate::tables::Ipv6Handling`] says, never parsed.
//!
//! Fragments: Sluice neither reassembles nor tracks fragments. Every IPv4 fragment, first or
//! later, is dropped with [`DropReason::Fragment`]: a later fragment has no ports, so it can be
//! neither matched to a service nor judged by a port-based policy, and letting only the first
//! through would waste the bandwidth. Pods avoid fragmentation through their route MTUs (1450
//! towards other nodes) and TCP's path MTU discovery.

use crate::checksum;
use crate::flow::FlowKey;
use crate::flow::proto;
use crate::frame::Frame;
use crate::tables::{Ipv6Handling, Tables};
use crate::verdict::{DropReason, Verdict};
use crate::wire::ethernet::{self, Mac};
use crate::wire::{icmp, ipv4, tcp, udp};

/// Offset of the IPv4 header in the frame (no VLAN tags).
pub const L3_OFFSET: usize = ethernet::HEADER_LEN;

/// What kind of ICMP message a packet is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpKind {
    /// Not ICMP.
    None,
    /// Echo request or reply (the id is in both ports).
    Echo,
    /// An error with an embedded datagram header at `inner_off` (an offset into the frame).
    Error { inner_off: usize },
    /// Any other ICMP message.
    Other,
}

/// A valid IPv4 packet, as the later stages see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parsed {
    /// Offset of the L4 header in the frame.
    pub l4_off: usize,
    /// L4 bytes (IPv4 total length minus header length).
    pub l4_len: usize,
    /// IPv4 total length.
    pub ip_len: u16,
    pub proto: u8,
    pub src: [u8; 4],
    pub dst: [u8; 4],
    /// TCP/UDP ports; for ICMP echo the identifier in both; 0 otherwise.
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP flags (0 for other protocols).
    pub tcp_flags: u8,
    pub icmp: IcmpKind,
    pub ttl: u8,
    pub dont_frag: bool,
    /// The Ethernet source (where a NodePort client's frames came from on the uplink).
    pub src_mac: Mac,
    /// The TCP/UDP checksum field holds only the pseudo-header sum (CHECKSUM_PARTIAL, as a veth
    /// delivers frames whose sender offloads its checksum); set by the pipeline, not by `parse`.
    pub csum_partial: bool,
}

impl Parsed {
    /// The packet's 5-tuple.
    #[inline]
    pub fn key(&self) -> FlowKey {
        FlowKey {
            src: self.src,
            dst: self.dst,
            src_port: self.src_port,
            dst_port: self.dst_port,
            proto: self.proto,
        }
    }
}

/// The outcome of parsing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseOutcome {
    /// An IPv4 packet the pipeline handles.
    Ipv4(Parsed),
    /// Not for the pipeline: the final verdict (pass to the kernel, or drop with a reason).
    Done(Verdict),
}

/// Parse and validate the frame's headers.
pub fn parse(tables: &Tables, frame: &Frame<'_>) -> ParseOutcome {
    match parse_ipv4(frame) {
        Ok(p) => ParseOutcome::Ipv4(p),
        Err(NotIpv4::Ipv6) => ParseOutcome::Done(match tables.node.ipv6 {
            Ipv6Handling::Pass => Verdict::PassToKernel,
            Ipv6Handling::Drop => Verdict::Drop(DropReason::Ipv6),
        }),
        Err(NotIpv4::Other) => ParseOutcome::Done(Verdict::PassToKernel),
        Err(NotIpv4::Drop(r)) => ParseOutcome::Done(Verdict::Drop(r)),
    }
}

enum NotIpv4 {
    Ipv6,
    Other,
    Drop(DropReason),
}

/// The drop reason for a header that does not fit: split across buffers or truly short.
fn short(frame: &Frame<'_>, needed: usize) -> NotIpv4 {
    if frame.total_len() >= needed && frame.is_chained() {
        NotIpv4::Drop(DropReason::HeadersSplit)
    } else {
        NotIpv4::Drop(DropReason::Truncated)
    }
}

fn parse_ipv4(frame: &Frame<'_>) -> Result<Parsed, NotIpv4> {
    let head = frame.head();
    let eth =
        ethernet::Packet::new_checked(head).map_err(|_| NotIpv4::Drop(DropReason::Truncated))?;
    match eth.ethertype() {
        ethernet::ethertype::IPV4 => {}
        ethernet::ethertype::IPV6 => return Err(NotIpv4::Ipv6),
        _ => return Err(NotIpv4::Other),
    }
    // etherparse validates version, header length and total length against the header length.
    let ip = match etherparse::Ipv4HeaderSlice::from_slice(eth.payload()) {
        Ok(h) => h,
        Err(etherparse::err::ipv4::HeaderSliceError::Len(e)) => {
            return Err(short(frame, L3_OFFSET + e.required_len));
        }
        Err(etherparse::err::ipv4::HeaderSliceError::Content(_)) => {
            return Err(NotIpv4::Drop(DropReason::BadIpHeader));
        }
    };
    let hl = usize::from(ip.ihl()) * 4;
    let total = usize::from(ip.total_len());
    // etherparse's header slice does not hold the total length to at least the header length.
    if total < hl || total > frame.total_len() - L3_OFFSET {
        return Err(NotIpv4::Drop(DropReason::BadIpLength));
    }
    if checksum::checksum(ip.slice()) != 0 {
        return Err(NotIpv4::Drop(DropReason::BadIpChecksum));
    }
    if ip.is_fragmenting_payload() {
        return Err(NotIpv4::Drop(DropReason::Fragment));
    }
    let l4_off = L3_OFFSET + hl;
    let l4_len = total - hl;
    let mut p = Parsed {
        l4_off,
        l4_len,
        ip_len: ip.total_len(),
        proto: ip.protocol().0,
        src: ip.source(),
        dst: ip.destination(),
        src_port: 0,
        dst_port: 0,
        tcp_flags: 0,
        icmp: IcmpKind::None,
        ttl: ip.ttl(),
        dont_frag: ip.dont_fragment(),
        src_mac: eth.src(),
        csum_partial: false,
    };
    // The L4 header must lie inside the IP datagram and inside the first buffer.
    let l4_in_head = |need: usize| -> Result<&[u8], NotIpv4> {
        if l4_len < need {
            return Err(NotIpv4::Drop(DropReason::BadL4Header));
        }
        head.get(l4_off..l4_off + need)
            .ok_or_else(|| short(frame, l4_off + need))
    };
    match p.proto {
        proto::TCP => {
            let declared = tcp::declared_header_len(l4_in_head(tcp::MIN_HEADER_LEN)?)
                .unwrap_or(tcp::MIN_HEADER_LEN);
            // The whole header, options included, in the datagram and the first buffer.
            let t = tcp::Packet::new_checked(l4_in_head(declared.max(tcp::MIN_HEADER_LEN))?)
                .map_err(|_| NotIpv4::Drop(DropReason::BadL4Header))?;
            p.src_port = t.src_port();
            p.dst_port = t.dst_port();
            p.tcp_flags = t.flags();
        }
        proto::UDP => {
            let u = udp::Packet::new_checked(l4_in_head(udp::HEADER_LEN)?)
                .map_err(|_| NotIpv4::Drop(DropReason::BadL4Header))?;
            if usize::from(u.length()) != l4_len {
                return Err(NotIpv4::Drop(DropReason::BadL4Header));
            }
            p.src_port = u.src_port();
            p.dst_port = u.dst_port();
        }
        proto::ICMP => {
            let m = icmp::Packet::new_checked(l4_in_head(icmp::HEADER_LEN)?)
                .map_err(|_| NotIpv4::Drop(DropReason::BadL4Header))?;
            if m.is_echo() {
                p.src_port = m.echo_id();
                p.dst_port = m.echo_id();
                p.icmp = IcmpKind::Echo;
            } else if m.is_error() {
                // The embedded IPv4 header and 8 bytes must be there, in the first buffer.
                let inner_off = l4_off + icmp::HEADER_LEN;
                let inner = head
                    .get(inner_off..l4_off + l4_len.min(head.len() - l4_off))
                    .unwrap_or(&[]);
                let ip = ipv4::Packet::new_checked(inner)
                    .map_err(|_| NotIpv4::Drop(DropReason::BadL4Header))?;
                if inner.len() < ip.header_len() + 8 {
                    return Err(NotIpv4::Drop(DropReason::BadL4Header));
                }
                p.icmp = IcmpKind::Error { inner_off };
            } else {
                p.icmp = IcmpKind::Other;
            }
        }
        _ => {}
    }
    Ok(p)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::checksum;

    /// A TCP SYN 10.244.1.2:40000 -> 10.96.0.10:80 with correct checksums, inside `headroom`.
    pub fn tcp_syn(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20];
        f[..14].copy_from_slice(&[2, 0, 0, 0, 0, 0xaa, 2, 0, 0, 0, 0, 0xbb, 8, 0]);
        ipv4::Repr {
            src,
            dst,
            protocol: 6,
            tos: 0,
            ident: 1,
            dont_frag: true,
            ttl: 64,
            payload_len: 20,
        }
        .emit(&mut f[14..])
        .unwrap();
        let t = &mut f[34..];
        t[..4].copy_from_slice(&[
            (sport >> 8) as u8,
            sport as u8,
            (dport >> 8) as u8,
            dport as u8,
        ]);
        t[12] = 0x50;
        t[13] = tcp::flags::SYN;
        let c = checksum::l4_full(
            &Frame::new(&mut f.clone(), 0, 54),
            34,
            20,
            tcp::CHECKSUM_OFFSET,
            checksum::pseudo_header_sum(src, dst, 6, 20),
        );
        f[34 + 16..34 + 18].copy_from_slice(&c.to_be_bytes());
        f
    }

    fn run(bytes: &mut [u8]) -> ParseOutcome {
        let t = crate::tables::tests::demo_tables();
        let n = bytes.len();
        parse(&t, &Frame::new(bytes, 0, n))
    }

    #[test]
    fn valid_tcp() {
        let mut f = tcp_syn([10, 244, 1, 2], [10, 96, 0, 10], 40000, 80);
        let ParseOutcome::Ipv4(p) = run(&mut f) else {
            panic!()
        };
        assert_eq!(
            (p.proto, p.src_port, p.dst_port, p.l4_off, p.l4_len),
            (6, 40000, 80, 34, 20)
        );
        assert_eq!(p.tcp_flags, tcp::flags::SYN);
    }

    #[test]
    fn bad_frames_drop_with_reasons() {
        let good = tcp_syn([10, 244, 1, 2], [10, 96, 0, 10], 40000, 80);
        let drop = |r| ParseOutcome::Done(Verdict::Drop(r));
        assert_eq!(run(&mut good[..10].to_vec()), drop(DropReason::Truncated));
        assert_eq!(run(&mut good[..30].to_vec()), drop(DropReason::Truncated));
        assert_eq!(run(&mut good[..50].to_vec()), drop(DropReason::BadIpLength));
        let mut f = good.clone();
        f[14 + 10] ^= 0xff;
        assert_eq!(run(&mut f), drop(DropReason::BadIpChecksum));
        let mut f = good.clone();
        f[14] = 0x65;
        assert_eq!(run(&mut f), drop(DropReason::BadIpHeader));
        let mut f = good.clone();
        f[34 + 12] = 0x40; // data offset 4
        assert_eq!(run(&mut f), drop(DropReason::BadL4Header));
        let mut f = good.clone();
        let mut ip = ipv4::Packet::new_checked(&mut f[14..]).unwrap();
        ip.set_ident(2);
        f[14 + 6] = 0x20; // MF
        ipv4::Packet::new_checked(&mut f[14..])
            .unwrap()
            .fill_checksum();
        assert_eq!(run(&mut f), drop(DropReason::Fragment));
        let mut f = good.clone();
        f[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(run(&mut f), ParseOutcome::Done(Verdict::PassToKernel));
        f[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(run(&mut f), ParseOutcome::Done(Verdict::PassToKernel));
    }

    /// A total length shorter than the header (0 here) is a bad length, not an underflow (found
    /// by the `vxlan_receive` fuzz target: `l4_len = total - hl` panicked with overflow checks
    /// and wrapped without).
    #[test]
    fn total_length_below_the_header_length() {
        let good = tcp_syn([10, 244, 1, 2], [10, 96, 0, 10], 40000, 80);
        for total in [0u16, 19] {
            let mut f = good.clone();
            f[14 + 2..14 + 4].copy_from_slice(&total.to_be_bytes());
            ipv4::Packet::new_checked(&mut f[14..])
                .unwrap()
                .fill_checksum();
            assert_eq!(
                run(&mut f),
                ParseOutcome::Done(Verdict::Drop(DropReason::BadIpLength)),
                "total length {total}"
            );
        }
    }

    #[test]
    fn headers_split_across_buffers() {
        let good = tcp_syn([10, 244, 1, 2], [10, 96, 0, 10], 40000, 80);
        let mut head = good[..40].to_vec();
        let rest = good[40..].to_vec();
        let tail: [&[u8]; 1] = [&rest];
        let t = crate::tables::tests::demo_tables();
        let f = Frame::new(&mut head, 0, 40).with_tail(&tail);
        assert_eq!(
            parse(&t, &f),
            ParseOutcome::Done(Verdict::Drop(DropReason::HeadersSplit))
        );
    }
}
