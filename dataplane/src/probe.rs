//! Probe frames: the synthetic packets a trace sends through the pipeline (`sluicectl trace` asks
//! an agent to build one, [`crate::pipeline::trace`] runs it), and the frame builders of the test
//! fixtures (`demo`). Off the hot path: building a frame allocates.
//!
//! A probe is a well-formed Ethernet + IPv4 frame (DF set, TTL as given, identification
//! `0x4242`) with a TCP segment (20-byte header, sequence 1, window 64240), a UDP datagram or an
//! ICMP echo, every checksum correct.

use crate::checksum;
use crate::flow::proto;
use crate::wire::ethernet::{self, Mac};
use crate::wire::{icmp, ipv4, tcp, udp};

/// The transport header of a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeL4 {
    Tcp {
        src_port: u16,
        dst_port: u16,
        /// TCP flags (`wire::tcp::flags`).
        flags: u8,
    },
    Udp {
        src_port: u16,
        dst_port: u16,
    },
    /// An echo request (or reply) with identifier `id`, which conntrack and NAT use as both ports.
    IcmpEcho {
        id: u16,
        seq: u16,
        reply: bool,
    },
}

/// A packet to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub src_mac: Mac,
    pub dst_mac: Mac,
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub ttl: u8,
    pub l4: ProbeL4,
}

impl Probe {
    /// The frame, carrying `payload` after the transport header.
    pub fn frame(&self, payload: &[u8]) -> Vec<u8> {
        let (protocol, l4) = match self.l4 {
            ProbeL4::Tcp {
                src_port,
                dst_port,
                flags,
            } => {
                let mut l4 = vec![0u8; tcp::MIN_HEADER_LEN];
                l4[0..2].copy_from_slice(&src_port.to_be_bytes());
                l4[2..4].copy_from_slice(&dst_port.to_be_bytes());
                l4[4..8].copy_from_slice(&1u32.to_be_bytes());
                l4[12] = 0x50;
                l4[13] = flags;
                l4[14..16].copy_from_slice(&64240u16.to_be_bytes());
                l4.extend_from_slice(payload);
                let sum = l4_checksum(self.src, self.dst, proto::TCP, &l4);
                l4[16..18].copy_from_slice(&sum.to_be_bytes());
                (proto::TCP, l4)
            }
            ProbeL4::Udp { src_port, dst_port } => {
                let mut l4 = vec![0u8; udp::HEADER_LEN];
                let r = udp::Repr {
                    src_port,
                    dst_port,
                    payload_len: payload.len() as u16,
                    checksum: 0,
                };
                let _ = r.emit(&mut l4);
                l4.extend_from_slice(payload);
                let sum = match l4_checksum(self.src, self.dst, proto::UDP, &l4) {
                    0 => 0xffff,
                    v => v,
                };
                l4[udp::CHECKSUM_OFFSET..udp::CHECKSUM_OFFSET + 2]
                    .copy_from_slice(&sum.to_be_bytes());
                (proto::UDP, l4)
            }
            ProbeL4::IcmpEcho { id, seq, reply } => {
                let t = if reply {
                    icmp::kind::ECHO_REPLY
                } else {
                    icmp::kind::ECHO_REQUEST
                };
                let mut l4 = vec![0u8; icmp::HEADER_LEN];
                let _ = icmp::Repr::echo(t, id, seq).emit(&mut l4);
                l4.extend_from_slice(payload);
                let c = checksum::checksum(&l4);
                l4[2..4].copy_from_slice(&c.to_be_bytes());
                (proto::ICMP, l4)
            }
        };
        ip_frame(self, protocol, &l4)
    }
}

/// The TCP or UDP checksum of `l4` (its checksum field zero) under the pseudo-header.
fn l4_checksum(src: [u8; 4], dst: [u8; 4], protocol: u8, l4: &[u8]) -> u16 {
    let mut c = checksum::Checksum::new();
    c.add_u32(checksum::pseudo_header_sum(
        src,
        dst,
        protocol,
        l4.len() as u16,
    ));
    c.add_bytes(l4);
    c.finish()
}

/// An Ethernet + IPv4 frame with the addresses of `p` around the transport bytes `l4`.
pub fn ip_frame(p: &Probe, protocol: u8, l4: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; ethernet::HEADER_LEN + ipv4::MIN_HEADER_LEN];
    let eth = ethernet::Repr {
        dst: p.dst_mac,
        src: p.src_mac,
        ethertype: ethernet::ethertype::IPV4,
    };
    let _ = eth.emit(&mut f);
    let ip = ipv4::Repr {
        src: p.src,
        dst: p.dst,
        protocol,
        tos: 0,
        ident: 0x4242,
        dont_frag: true,
        ttl: p.ttl,
        payload_len: l4.len() as u16,
    };
    let _ = ip.emit(&mut f[ethernet::HEADER_LEN..]);
    f.extend_from_slice(l4);
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Frame;
    use crate::parse::{self, ParseOutcome};

    #[test]
    fn probes_parse_with_their_tuple() {
        let t = crate::demo::demo_tables();
        for l4 in [
            ProbeL4::Tcp {
                src_port: 40000,
                dst_port: 80,
                flags: tcp::flags::SYN,
            },
            ProbeL4::Udp {
                src_port: 5353,
                dst_port: 53,
            },
            ProbeL4::IcmpEcho {
                id: 7,
                seq: 1,
                reply: false,
            },
        ] {
            let p = Probe {
                src_mac: Mac([2, 0, 0, 0, 0, 1]),
                dst_mac: Mac([2, 0, 0, 0, 0, 2]),
                src: [10, 244, 1, 2],
                dst: [10, 96, 0, 10],
                ttl: 64,
                l4,
            };
            let mut b = p.frame(b"hello");
            let n = b.len();
            let ParseOutcome::Ipv4(parsed) = parse::parse(&t, &Frame::new(&mut b, 0, n)) else {
                panic!("{l4:?} does not parse");
            };
            assert_eq!((parsed.src, parsed.dst, parsed.ttl), (p.src, p.dst, 64));
            assert!(!checksum::is_partial(&Frame::new(&mut b, 0, n), &parsed));
        }
    }
}
