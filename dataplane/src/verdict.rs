//! What the pipeline decides for a frame, and why it drops one.

/// A port the pipeline can transmit on: one AF_XDP socket (a pod's host veth, or the uplink),
/// numbered by the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortId(pub u32);

/// The pipeline's decision for one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Transmit the (rewritten) frame on this port: first descriptor from `Frame::offset()` and
    /// `Frame::len()`, tail descriptors unchanged.
    Forward(PortId),
    /// Drop the frame; the reason has been counted.
    Drop(DropReason),
    /// Hand the frame to the kernel's stack (ARP, host-bound and outside traffic, IPv6 when so
    /// configured). Its headers are unchanged, except that a partial L4 checksum may have been
    /// completed and that VXLAN from another node has been decapsulated: the frame window is then
    /// the inner frame.
    PassToKernel,
    /// Another worker of the node owns this frame's connection (`steer`): hand the frame to worker
    /// `.0` as it arrived, with its ingress port. The pipeline changed none of its bytes (only its
    /// window may have moved) and counted it in [`Counters::steered`] only.
    Steer(u16),
    /// The frame, rewritten for its route to another node (NAT, TTL, inner MACs) but not yet
    /// encapsulated, is larger than that route carries: the transmitter cuts it with
    /// `segment::plan` (the tables' `vxlan_mtu`; software TSO for TCP, IPv4 fragments for the rest)
    /// and VXLAN-encapsulates every piece towards `route::tunnel_to` of its destination, on this
    /// port. Counted as one forwarded frame.
    Segment(PortId),
    /// The frame may not be fragmented (DF, not TCP) and is larger than its route to another node
    /// carries (`.0` bytes): the transmitter answers its sender with ICMP "fragmentation needed"
    /// (`segment::frag_needed`, from this node's VTEP address) on the ingress port and drops the
    /// frame. The frame is as it arrived (no NAT applied), so the ICMP quotes what the sender
    /// sent. Counted as a drop [`DropReason::FragmentationNeeded`].
    FragNeeded(u16),
}

macro_rules! drop_reasons {
    ($( $(#[doc = $doc:literal])* $name:ident = $label:literal, )*) => {
        /// Why a frame was dropped. Indexes the per-worker drop counters.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum DropReason {
            $( $(#[doc = $doc])* $name, )*
        }
        impl DropReason {
            /// Every reason, in counter order.
            pub const ALL: &'static [DropReason] = &[$(DropReason::$name,)*];
            /// The number of reasons (the length of a counter array).
            pub const COUNT: usize = Self::ALL.len();
            /// A short stable name (metrics label, demo output).
            pub fn as_str(self) -> &'static str {
                match self { $(DropReason::$name => $label,)* }
            }
        }
    };
}

drop_reasons! {
    /// The frame is shorter than the headers it announces.
    Truncated = "truncated",
    /// The frame's headers do not all fit in its first buffer.
    HeadersSplit = "headers_split",
    /// The IPv4 header is invalid (version, header length, total length).
    BadIpHeader = "bad_ip_header",
    /// The IPv4 header checksum is wrong.
    BadIpChecksum = "bad_ip_checksum",
    /// The IPv4 total length exceeds the frame.
    BadIpLength = "bad_ip_length",
    /// The TCP, UDP or ICMP header is invalid or truncated.
    BadL4Header = "bad_l4_header",
    /// An IPv4 fragment (fragments are not reassembled or tracked; see `parse`).
    Fragment = "fragment",
    /// An IPv6 frame while the node is configured to drop IPv6.
    Ipv6 = "ipv6",
    /// The source address does not belong to the pod on the ingress port (spoofing).
    SpoofedSource = "spoofed_source",
    /// The TTL would reach zero.
    TtlExceeded = "ttl_exceeded",
    /// A VXLAN frame with malformed outer or inner headers.
    VxlanMalformed = "vxlan_malformed",
    /// A VXLAN frame whose outer IPv4 header checksum is wrong.
    VxlanBadChecksum = "vxlan_bad_checksum",
    /// A VXLAN frame without the I flag or with another VNI.
    VxlanWrongVni = "vxlan_wrong_vni",
    /// A service with no ready backend.
    NoBackend = "no_backend",
    /// NetworkPolicy: the source pod's egress policy denies the flow.
    PolicyDeniedEgress = "policy_denied_egress",
    /// NetworkPolicy: the destination pod's ingress policy denies the flow.
    PolicyDeniedIngress = "policy_denied_ingress",
    /// The destination is in the cluster CIDR but no local pod or node owns it.
    NoRoute = "no_route",
    /// The packet exceeds the MTU of its route (no fragmentation; pods get route MTUs).
    FrameTooBig = "frame_too_big",
    /// Not enough headroom in the frame buffer for the VXLAN headers.
    NoHeadroom = "no_headroom",
    /// The connection tracking table is full of live flows.
    ConntrackFull = "conntrack_full",
    /// No free source port for NodePort SNAT to this backend.
    NatPortExhausted = "nat_port_exhausted",
    /// A frame larger than its route carries with DF set (not TCP): answered with ICMP
    /// "fragmentation needed" ([`Verdict::FragNeeded`]).
    FragmentationNeeded = "fragmentation_needed",
    /// An ICMP error about no tracked flow.
    IcmpErrorUnrelated = "icmp_error_unrelated",
    /// A packet conntrack judges invalid for the flow's TCP state.
    ConntrackInvalid = "conntrack_invalid",
}

/// Per-worker counters. Plain integers: each worker owns its own, the agent sums them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counters {
    /// Frames processed (not counting those steered to another worker).
    pub rx: u64,
    /// Frames left to the worker that owns their connection ([`Verdict::Steer`]).
    pub steered: u64,
    /// Frames forwarded.
    pub tx: u64,
    /// Frames passed to the kernel.
    pub passed: u64,
    /// Frames dropped, by [`DropReason`] (`drops[reason as usize]`).
    pub drops: [u64; DropReason::COUNT],
    /// Bytes of the frames processed, as they arrived (all buffers of a multi-buffer frame).
    pub rx_bytes: u64,
    /// Bytes of the frames forwarded, as they left (after encap, decap or NAT).
    pub tx_bytes: u64,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            rx: 0,
            steered: 0,
            tx: 0,
            passed: 0,
            drops: [0; DropReason::COUNT],
            rx_bytes: 0,
            tx_bytes: 0,
        }
    }
}

impl Counters {
    /// Count one verdict.
    #[inline]
    pub fn count(&mut self, v: Verdict) {
        if let Verdict::Steer(_) = v {
            self.steered += 1;
            return;
        }
        self.rx += 1;
        match v {
            Verdict::Forward(_) | Verdict::Segment(_) => self.tx += 1,
            Verdict::PassToKernel => self.passed += 1,
            Verdict::Drop(r) => self.drops[r as usize] += 1,
            Verdict::FragNeeded(_) => self.drops[DropReason::FragmentationNeeded as usize] += 1,
            Verdict::Steer(_) => {}
        }
    }
    /// Count one verdict and the frame's bytes in (`rx`) and, when forwarded, out (`tx`).
    #[inline]
    pub fn count_frame(&mut self, v: Verdict, rx: usize, tx: usize) {
        self.count(v);
        if let Verdict::Steer(_) = v {
            return;
        }
        self.rx_bytes += rx as u64;
        if let Verdict::Forward(_) | Verdict::Segment(_) = v {
            self.tx_bytes += tx as u64;
        }
    }
    /// Drops of one reason.
    pub fn dropped(&self, r: DropReason) -> u64 {
        self.drops[r as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_index_counters() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        let mut c = Counters::default();
        c.count(Verdict::Drop(DropReason::NoRoute));
        c.count(Verdict::Forward(PortId(1)));
        assert_eq!((c.rx, c.tx, c.dropped(DropReason::NoRoute)), (2, 1, 1));
        assert_eq!(DropReason::NoRoute.as_str(), "no_route");
    }
}
