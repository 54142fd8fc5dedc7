//! The 5-tuple of a flow direction ([`FlowKey`]), the one key every stage shares: conntrack
//! indexes by it, NAT rewrites a packet to another one, steering, Maglev and the VXLAN source port
//! hash it, events report it. Also the IP protocol numbers the pipeline knows ([`proto`]) and the
//! port protocols of Kubernetes objects with their one mapping from the API's names
//! ([`Protocol`]).
//!
//! Addresses are kept as the packet carries them (network byte order), so building a key from a
//! header and writing one back are plain copies.

/// IP protocol numbers.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const SCTP: u8 = 132;
}

/// The protocol of a port in a Kubernetes object (`ServicePort`, `EndpointPort`,
/// `ContainerPort`, `NetworkPolicyPort`).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The protocol of a Kubernetes protocol name: absent or empty means TCP, as the API defaults
    /// it; `None` for a name Kubernetes does not define (names are case-sensitive).
    pub fn from_k8s(name: Option<&str>) -> Option<Self> {
        match name.unwrap_or("") {
            "" | "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }

    /// The name the Kubernetes API uses.
    pub fn k8s_name(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }

    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => proto::TCP,
            Self::Udp => proto::UDP,
            Self::Sctp => proto::SCTP,
        }
    }

    /// The protocol of an IP protocol number, if it is one of these.
    pub fn from_number(p: u8) -> Option<Self> {
        match p {
            proto::TCP => Some(Self::Tcp),
            proto::UDP => Some(Self::Udp),
            proto::SCTP => Some(Self::Sctp),
            _ => None,
        }
    }
}

/// An IPv4 flow 5-tuple as the packet carries it. For ICMP echo both ports hold the echo
/// identifier, so the reply's reversed key matches; other ICMP and protocols without ports have
/// zero ports.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct FlowKey {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
}

impl FlowKey {
    /// The key of a packet going the other way.
    #[inline]
    pub fn reversed(&self) -> FlowKey {
        FlowKey {
            src: self.dst,
            dst: self.src,
            src_port: self.dst_port,
            dst_port: self.src_port,
            proto: self.proto,
        }
    }

    /// A hash of the key that is the same on every node and version: XXH3-64 with seed 0 of the 13
    /// bytes `src, dst, src_port, dst_port` (big-endian) then `proto`. Used for Maglev backend choice,
    /// steering and the VXLAN source port.
    #[inline]
    pub fn hash64(&self) -> u64 {
        self.hash64_seeded(0)
    }

    /// [`Self::hash64`] with another seed.
    ///
    /// This is XXH3-64's 9-to-16-byte path (default secret) computed straight from the fields: the
    /// same value as `xxh3_64_with_seed(&key_bytes, seed)` (a test checks it against the crate), at
    /// a fraction of the cost, because building the byte array first stalls store forwarding.
    #[inline]
    pub fn hash64_seeded(&self, seed: u64) -> u64 {
        // XXH3 default secret: bytes 24..32 ^ 32..40, and 40..48 ^ 48..56, little-endian.
        const FLIP1: u64 = 0x6782_737b_ea42_39b9;
        const FLIP2: u64 = 0xaf56_bc3b_0996_523a;
        // The 13 bytes read little-endian: bytes 0..8 and bytes 5..13.
        let lo =
            u64::from(u32::from_le_bytes(self.src)) | u64::from(u32::from_le_bytes(self.dst)) << 32;
        let hi = lo >> 40
            | u64::from(self.src_port.swap_bytes()) << 24
            | u64::from(self.dst_port.swap_bytes()) << 40
            | u64::from(self.proto) << 56;
        let input_lo = lo ^ FLIP1.wrapping_add(seed);
        let input_hi = hi ^ FLIP2.wrapping_sub(seed);
        let product = u128::from(input_lo) * u128::from(input_hi);
        let mut h = 13u64
            .wrapping_add(input_lo.swap_bytes())
            .wrapping_add(input_hi)
            .wrapping_add(product as u64 ^ (product >> 64) as u64);
        // XXH3 avalanche.
        h ^= h >> 37;
        h = h.wrapping_mul(0x1656_6791_9e37_79f9);
        h ^ (h >> 32)
    }

    /// The 13 bytes [`Self::hash64`] hashes.
    pub fn to_bytes(self) -> [u8; 13] {
        let mut b = [0u8; 13];
        b[0..4].copy_from_slice(&self.src);
        b[4..8].copy_from_slice(&self.dst);
        b[8..10].copy_from_slice(&self.src_port.to_be_bytes());
        b[10..12].copy_from_slice(&self.dst_port.to_be_bytes());
        b[12] = self.proto;
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reverse_and_hash() {
        let k = FlowKey {
            src: [10, 244, 0, 1],
            dst: [10, 96, 0, 1],
            src_port: 40001,
            dst_port: 80,
            proto: proto::TCP,
        };
        assert_eq!(k.reversed().reversed(), k);
        assert_eq!(k.reversed().src, k.dst);
        assert_eq!(k.reversed().src_port, k.dst_port);
        assert_ne!(k.hash64(), k.reversed().hash64());
        // Golden: the flow hash feeds Maglev and the VXLAN source port on every node.
        let g = FlowKey {
            src: [10, 244, 1, 5],
            dst: [10, 96, 0, 1],
            src_port: 43210,
            dst_port: 80,
            proto: 6,
        };
        assert_eq!(g.hash64(), GOLDEN_FLOW_HASH);
        let icmp = FlowKey {
            src: [0, 0, 0, 1],
            dst: [0, 0, 0, 2],
            src_port: 9,
            dst_port: 9,
            proto: proto::ICMP,
        };
        assert_eq!(icmp.reversed().src_port, 9);
    }

    const GOLDEN_FLOW_HASH: u64 = 8606058817738423228;

    #[test]
    fn kubernetes_protocol_names() {
        assert_eq!(Protocol::from_k8s(None), Some(Protocol::Tcp));
        assert_eq!(Protocol::from_k8s(Some("")), Some(Protocol::Tcp));
        assert_eq!(Protocol::from_k8s(Some("UDP")), Some(Protocol::Udp));
        assert_eq!(Protocol::from_k8s(Some("SCTP")), Some(Protocol::Sctp));
        assert_eq!(
            Protocol::from_k8s(Some("udp")),
            None,
            "names are case-sensitive"
        );
        for p in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
            assert_eq!(Protocol::from_k8s(Some(p.k8s_name())), Some(p));
            assert_eq!(Protocol::from_number(p.number()), Some(p));
        }
        assert_eq!(Protocol::from_number(proto::ICMP), None);
        assert_eq!(Protocol::Sctp.number(), 132);
    }

    proptest! {
        /// The field-wise hash is XXH3-64 of the key bytes.
        #[test]
        fn hash_is_xxh3(src: [u8; 4], dst: [u8; 4], sp: u16, dp: u16, p: u8, seed: u64) {
            let k = FlowKey { src, dst, src_port: sp, dst_port: dp, proto: p };
            let b = k.to_bytes();
            prop_assert_eq!(k.hash64_seeded(seed), xxhash_rust::xxh3::xxh3_64_with_seed(&b, seed));
            prop_assert_eq!(k.hash64(), xxhash_rust::xxh3::xxh3_64(&b));
        }
    }
}
