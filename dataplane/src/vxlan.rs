//! VXLAN encapsulation and decapsulation, Flannel-compatible on the wire.
//!
//! What the kernel's vxlan device does with Flannel's settings (`vxlan id 1 dstport 8472
//! nolearning noudpcsum`), verified against frames it made on this machine
//! (`dataplane/testdata/vxlan-kernel.pcap`, `scripts/capture-vxlan-golden.sh`):
//! outer Ethernet from the uplink MAC to the next hop's MAC; outer IPv4 without options, TOS 0
//! with the inner ECN bits copied (CE becomes ECT(0)), TTL 64, DF clear, a per-sender
//! identification; outer UDP from a source port derived from the inner flow hash in the kernel's
//! local port range (32768..=60999, the kernel's `udp_flow_src_port` scaling), destination 8472,
//! checksum 0; VXLAN flags I, VNI 1. The inner Ethernet header goes from the local VTEP MAC to
//! the remote VTEP MAC. Encap needs [`OVERHEAD`] bytes of headroom.

use crate::frame::Frame;
use crate::wire::{WireError, ethernet, ipv4, udp, vxlan};

/// Bytes VXLAN adds in front of the inner Ethernet frame (outer Ethernet, IPv4, UDP, VXLAN).
pub const OVERHEAD: usize =
    ethernet::HEADER_LEN + ipv4::MIN_HEADER_LEN + udp::HEADER_LEN + vxlan::HEADER_LEN;
/// Flannel's VXLAN UDP port.
pub const FLANNEL_PORT: u16 = 8472;
/// Flannel's VNI.
pub const FLANNEL_VNI: u32 = 1;
/// The kernel's default local port range, from which the outer source port is drawn.
pub const SRC_PORT_MIN: u16 = 32768;
/// Upper end of that range (as `ip_local_port_range` reports it).
pub const SRC_PORT_MAX: u16 = 60999;
/// Outer TTL (the kernel's default `ip_default_ttl`, which vxlan uses when `ttl` is unset).
pub const OUTER_TTL: u8 = 64;

/// The outer headers of one tunnel direction: this node's uplink to a remote node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tunnel {
    pub src_mac: ethernet::Mac,
    pub dst_mac: ethernet::Mac,
    pub src_ip: [u8; 4],
    pub dst_ip: [u8; 4],
    pub vni: u32,
    pub dst_port: u16,
}

/// Why a frame could not be encapsulated or decapsulated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VxlanError {
    /// Not enough headroom in front of the frame for the outer headers.
    NoHeadroom,
    /// The (inner or outer) frame is too short or inconsistent.
    Malformed,
    /// The outer IPv4 header checksum is wrong.
    BadChecksum,
    /// The VXLAN header lacks the I flag or carries another VNI.
    WrongVni,
}

impl From<WireError> for VxlanError {
    fn from(_: WireError) -> Self {
        Self::Malformed
    }
}

/// The outer UDP source port for a flow hash (`FlowKey::hash64` of the inner 5-tuple), scaled into the kernel's range as
/// `udp_flow_src_port` does (`hash ^= hash << 16; ((u64)hash * (max - min)) >> 32) + min`).
pub fn src_port(flow_hash: u64) -> u16 {
    let mut h = (flow_hash ^ (flow_hash >> 32)) as u32;
    h ^= h << 16;
    let span = u64::from(SRC_PORT_MAX - SRC_PORT_MIN);
    SRC_PORT_MIN + ((u64::from(h) * span) >> 32) as u16
}

/// Wrap the inner Ethernet frame in `frame` (inner MACs already set) in outer headers for `t`.
/// `ip_id` is the outer IPv4 identification (the caller keeps a per-worker counter).
pub fn encap(
    frame: &mut Frame<'_>,
    t: &Tunnel,
    src_port: u16,
    ip_id: u16,
) -> Result<(), VxlanError> {
    let inner_len = frame.total_len();
    let inner_tos = frame
        .head()
        .get(ethernet::HEADER_LEN..)
        .and_then(|ip| ipv4::Packet::new_checked(ip).ok())
        .map_or(0, |p| p.tos());
    let outer_ip_payload = udp::HEADER_LEN + vxlan::HEADER_LEN + inner_len;
    let ip_payload = u16::try_from(outer_ip_payload).map_err(|_| VxlanError::Malformed)?;
    if usize::from(ip_payload) + ipv4::MIN_HEADER_LEN > usize::from(u16::MAX) {
        return Err(VxlanError::Malformed);
    }
    frame
        .push_front(OVERHEAD)
        .map_err(|_| VxlanError::NoHeadroom)?;
    let h = frame.head_mut();
    ethernet::Repr {
        dst: t.dst_mac,
        src: t.src_mac,
        ethertype: ethernet::ethertype::IPV4,
    }
    .emit(h)?;
    let h = &mut h[ethernet::HEADER_LEN..];
    ipv4::Repr {
        src: t.src_ip,
        dst: t.dst_ip,
        protocol: crate::flow::proto::UDP,
        tos: ecn_encapsulate(inner_tos),
        ident: ip_id,
        dont_frag: false,
        ttl: OUTER_TTL,
        payload_len: ip_payload,
    }
    .emit(h)?;
    let h = &mut h[ipv4::MIN_HEADER_LEN..];
    udp::Repr {
        src_port,
        dst_port: t.dst_port,
        payload_len: ip_payload - udp::HEADER_LEN as u16,
        checksum: 0,
    }
    .emit(h)?;
    vxlan::Repr { vni: t.vni }.emit(&mut h[udp::HEADER_LEN..])?;
    Ok(())
}

/// The outer TOS for an inner TOS: 0 plus the inner ECN bits, CE mapped to ECT(0) (the kernel's
/// `INET_ECN_encapsulate` with tos 0).
fn ecn_encapsulate(inner_tos: u8) -> u8 {
    match inner_tos & 0x03 {
        0x03 => 0x02,
        ecn => ecn,
    }
}

/// What a decapsulated frame came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decapped {
    /// The outer source address (the sending node's underlay address).
    pub outer_src: [u8; 4],
    /// The outer UDP source port.
    pub outer_src_port: u16,
}

/// Whether the frame is VXLAN to `local_ip` on `port` (cheap check on the outer headers only).
pub fn is_vxlan_to(head: &[u8], local_ip: [u8; 4], port: u16) -> bool {
    let Ok(eth) = ethernet::Packet::new_checked(head) else {
        return false;
    };
    if eth.ethertype() != ethernet::ethertype::IPV4 {
        return false;
    }
    let Ok(ip) = ipv4::Packet::new_checked(eth.payload()) else {
        return false;
    };
    if ip.dst() != local_ip || ip.protocol() != crate::flow::proto::UDP || ip.is_fragment() {
        return false;
    }
    let hl = ip.header_len();
    udp::Packet::new_checked(&eth.payload()[hl..]).is_ok_and(|u| u.dst_port() == port)
}

/// Strip the outer headers of a VXLAN frame (outer IPv4 options allowed), checking the outer IPv4
/// header checksum, the I flag and the VNI. The outer UDP checksum is not verified (Flannel sends
/// none). On success the frame holds the inner Ethernet frame.
pub fn decap(frame: &mut Frame<'_>, vni: u32) -> Result<Decapped, VxlanError> {
    let head = frame.head();
    let eth = ethernet::Packet::new_checked(head)?;
    let ip = ipv4::Packet::new_checked(eth.payload())?;
    if !ip.verify_checksum() {
        return Err(VxlanError::BadChecksum);
    }
    let hl = ip.header_len();
    let total = usize::from(ip.total_len());
    if total < hl + udp::HEADER_LEN + vxlan::HEADER_LEN + ethernet::HEADER_LEN
        || total > frame.total_len() - ethernet::HEADER_LEN
    {
        return Err(VxlanError::Malformed);
    }
    let u = udp::Packet::new_checked(&eth.payload()[hl..])?;
    let v = vxlan::Packet::new_checked(u.payload())?;
    if v.flags() & vxlan::FLAG_I == 0 || v.vni() != vni {
        return Err(VxlanError::WrongVni);
    }
    let out = Decapped {
        outer_src: ip.src(),
        outer_src_port: u.src_port(),
    };
    let outer = ethernet::HEADER_LEN + hl + udp::HEADER_LEN + vxlan::HEADER_LEN;
    // Drop trailing padding of the outer frame (single-buffer frames only).
    if !frame.is_chained() {
        frame.truncate_head(ethernet::HEADER_LEN + total);
    }
    frame.pull_front(outer).map_err(|_| VxlanError::Malformed)?;
    if frame.len() < ethernet::HEADER_LEN {
        return Err(VxlanError::Malformed);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum;
    use crate::pcap;
    use crate::wire::ethernet::Mac;
    use crate::wire::{icmp, tcp};

    const UL_A_MAC: Mac = Mac([2, 0, 0xc0, 0xa8, 0x32, 1]);
    const UL_B_MAC: Mac = Mac([2, 0, 0xc0, 0xa8, 0x32, 2]);
    const UL_A: [u8; 4] = [192, 168, 50, 1];
    const UL_B: [u8; 4] = [192, 168, 50, 2];

    fn golden() -> Vec<Vec<u8>> {
        pcap::read_frames(include_bytes!("../testdata/vxlan-kernel.pcap")).unwrap()
    }

    /// Decap every kernel-made frame, re-encap its inner frame with our code and compare the whole
    /// frame byte for byte. Two outer fields are taken from the kernel's frame instead of our own
    /// choice, because the kernel fills them from state we cannot reproduce: the outer IPv4
    /// identification (a per-destination counter seeded at random) and the outer UDP source port
    /// (the kernel's jhash of the inner flow with a boot-time random seed; we check ours is in the
    /// same range). Everything else, outer IPv4 checksum included, is ours and must match.
    #[test]
    fn reencap_matches_kernel_byte_for_byte() {
        let frames = golden();
        assert!(
            frames.len() >= 10,
            "golden pcap has {} frames",
            frames.len()
        );
        for (i, orig) in frames.iter().enumerate() {
            let a_to_b = orig[..6] == UL_B_MAC.0;
            let t = if a_to_b {
                Tunnel {
                    src_mac: UL_A_MAC,
                    dst_mac: UL_B_MAC,
                    src_ip: UL_A,
                    dst_ip: UL_B,
                    vni: 1,
                    dst_port: FLANNEL_PORT,
                }
            } else {
                Tunnel {
                    src_mac: UL_B_MAC,
                    dst_mac: UL_A_MAC,
                    src_ip: UL_B,
                    dst_ip: UL_A,
                    vni: 1,
                    dst_port: FLANNEL_PORT,
                }
            };
            let mut buf = vec![0u8; 256 + orig.len()];
            buf[256..].copy_from_slice(orig);
            let mut f = Frame::new(&mut buf, 256, orig.len());
            assert!(is_vxlan_to(f.head(), t.dst_ip, FLANNEL_PORT), "frame {i}");
            let d = decap(&mut f, FLANNEL_VNI).unwrap();
            assert_eq!(d.outer_src, t.src_ip);
            assert_eq!(f.len(), orig.len() - OVERHEAD);
            let ident = u16::from_be_bytes([orig[18], orig[19]]);
            let sport = u16::from_be_bytes([orig[34], orig[35]]);
            assert!((SRC_PORT_MIN..=SRC_PORT_MAX).contains(&sport));
            encap(&mut f, &t, sport, ident).unwrap();
            assert_eq!(f.head(), &orig[..], "frame {i} differs after re-encap");
        }
    }

    #[test]
    fn our_src_port_is_in_kernel_range_and_spreads() {
        let mut seen = std::collections::HashSet::new();
        for h in 0..1000u64 {
            let key = crate::flow::FlowKey {
                src: (h as u32).to_be_bytes(),
                dst: [0, 0, 0, 7],
                src_port: 1,
                dst_port: 2,
                proto: 6,
            };
            let p = src_port(key.hash64());
            assert!((SRC_PORT_MIN..=SRC_PORT_MAX).contains(&p));
            seen.insert(p);
        }
        assert!(seen.len() > 900);
    }

    /// The kernel's inner frames, captured on the veth underlay, carry partial L4 checksums
    /// (CHECKSUM_PARTIAL): the field holds the folded pseudo-header sum.
    #[test]
    fn kernel_inner_frames_carry_partial_checksums() {
        let mut partial = 0;
        for orig in golden() {
            let inner = &orig[OVERHEAD..];
            let ip = ipv4::Packet::new_checked(&inner[14..]).unwrap();
            let l4 = &inner[14 + ip.header_len()..14 + usize::from(ip.total_len())];
            let pseudo =
                checksum::pseudo_header_folded(ip.src(), ip.dst(), ip.protocol(), l4.len() as u16);
            let field = match ip.protocol() {
                6 => tcp::Packet::new_checked(l4).unwrap().checksum(),
                17 => udp::Packet::new_checked(l4).unwrap().checksum(),
                _ => {
                    assert_eq!(checksum::checksum(l4), 0, "ICMP is always complete");
                    assert!(icmp::Packet::new_checked(l4).is_ok());
                    continue;
                }
            };
            if field == pseudo {
                partial += 1;
            }
        }
        assert!(partial >= 5, "{partial} partial frames");
    }

    #[test]
    fn decap_rejects_bad_frames() {
        let orig = golden().remove(0);
        let mut b = orig.clone();
        b[14 + 10] ^= 1; // outer IP checksum
        assert_eq!(
            decap(&mut Frame::new(&mut b, 0, orig.len()), 1),
            Err(VxlanError::BadChecksum)
        );
        let mut b = orig.clone();
        assert_eq!(
            decap(&mut Frame::new(&mut b, 0, orig.len()), 2),
            Err(VxlanError::WrongVni)
        );
        let mut b = orig.clone();
        assert_eq!(
            decap(&mut Frame::new(&mut b, 0, 60), 1),
            Err(VxlanError::Malformed)
        );
        let mut b = orig.clone();
        let mut f = Frame::new(&mut b, 0, orig.len());
        assert_eq!(
            encap(
                &mut f,
                &Tunnel {
                    src_mac: Mac([0; 6]),
                    dst_mac: Mac([0; 6]),
                    src_ip: [0; 4],
                    dst_ip: [0; 4],
                    vni: 1,
                    dst_port: 1
                },
                1,
                1
            ),
            Err(VxlanError::NoHeadroom)
        );
    }
}
