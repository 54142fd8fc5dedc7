//! The Internet checksum (RFC 1071): full computation over a buffer chain, incremental updates
//! (RFC 1624, equation 3) for NAT rewrites of IPv4, TCP and UDP, and repair of the partial
//! checksums veth delivers (CHECKSUM_PARTIAL: the L4 field holds the folded pseudo-header sum,
//! not complemented).
//!
//! Also the completion of a partial L4 checksum in place ([`complete_partial`]), which every
//! forwarded frame from a veth may need.
//!
//! Pure arithmetic; nothing here panics.

use crate::flow::proto;
use crate::frame::Frame;
use crate::parse::Parsed;
use crate::wire::{get16, set16, tcp, udp};

/// A running one's-complement sum that can be fed byte slices of any length in order (odd
/// lengths are carried across slices, so a chain sums as if contiguous).
#[derive(Clone, Copy, Debug, Default)]
pub struct Checksum {
    sum: u64,
    odd: Option<u8>,
}

impl Checksum {
    /// An empty sum.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a 32-bit partial sum (for example a pseudo-header sum).
    pub fn add_u32(&mut self, v: u32) {
        self.sum += u64::from(v);
    }

    /// Add bytes, continuing after whatever was added before.
    pub fn add_bytes(&mut self, mut data: &[u8]) {
        if let Some(hi) = self.odd.take() {
            match data.split_first() {
                Some((&lo, rest)) => {
                    self.sum += u64::from(u16::from_be_bytes([hi, lo]));
                    data = rest;
                }
                None => {
                    self.odd = Some(hi);
                    return;
                }
            }
        }
        let mut chunks = data.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            self.sum += (w >> 48) + ((w >> 32) & 0xffff) + ((w >> 16) & 0xffff) + (w & 0xffff);
        }
        let mut rest = chunks.remainder().chunks_exact(2);
        for c in &mut rest {
            self.sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [b] = rest.remainder() {
            self.odd = Some(*b);
        }
    }

    /// The folded 16-bit sum (not complemented).
    pub fn fold(&self) -> u16 {
        let mut s = self.sum;
        if let Some(hi) = self.odd {
            s += u64::from(hi) << 8;
        }
        fold64(s)
    }

    /// The checksum field value: the complement of the folded sum.
    pub fn finish(&self) -> u16 {
        !self.fold()
    }
}

fn fold64(mut s: u64) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// The checksum of one contiguous slice (for IPv4 headers, ICMP messages).
pub fn checksum(data: &[u8]) -> u16 {
    let mut c = Checksum::new();
    c.add_bytes(data);
    c.finish()
}

/// The unfolded sum of the IPv4 pseudo-header for TCP/UDP.
pub fn pseudo_header_sum(src: [u8; 4], dst: [u8; 4], proto: u8, l4_len: u16) -> u32 {
    u32::from(u16::from_be_bytes([src[0], src[1]]))
        + u32::from(u16::from_be_bytes([src[2], src[3]]))
        + u32::from(u16::from_be_bytes([dst[0], dst[1]]))
        + u32::from(u16::from_be_bytes([dst[2], dst[3]]))
        + u32::from(proto)
        + u32::from(l4_len)
}

/// The folded pseudo-header sum, which is what a CHECKSUM_PARTIAL frame carries in its L4
/// checksum field.
pub fn pseudo_header_folded(src: [u8; 4], dst: [u8; 4], proto: u8, l4_len: u16) -> u16 {
    fold64(u64::from(pseudo_header_sum(src, dst, proto, l4_len)))
}

/// The full TCP/UDP checksum of the L4 segment starting at `l4_off` in `frame` (header and
/// payload, over the whole chain), with the checksum field taken as zero. `csum_off` is the
/// field's offset inside the L4 header. The segment is `l4_len` bytes (bytes beyond it, such as
/// Ethernet padding, are ignored).
pub fn l4_full(
    frame: &Frame<'_>,
    l4_off: usize,
    l4_len: usize,
    csum_off: usize,
    pseudo: u32,
) -> u16 {
    let mut c = Checksum::new();
    c.add_u32(pseudo);
    let mut left = l4_len;
    let mut pos = 0usize; // position inside the segment
    for chunk in frame.chunks_from(l4_off) {
        if left == 0 {
            break;
        }
        let chunk = &chunk[..chunk.len().min(left)];
        // Skip the two checksum bytes (treat as zero) if they are in this chunk.
        let (a, b) = (csum_off, csum_off + 2);
        let (start, end) = (pos, pos + chunk.len());
        if b <= start || a >= end {
            c.add_bytes(chunk);
        } else {
            let ca = a.saturating_sub(start).min(chunk.len());
            let cb = b.saturating_sub(start).min(chunk.len());
            c.add_bytes(&chunk[..ca]);
            // keep byte alignment: the skipped bytes count as zeros
            c.add_bytes(&[0u8, 0][..cb - ca]);
            c.add_bytes(&chunk[cb..]);
        }
        pos = end;
        left -= chunk.len();
    }
    c.finish()
}

/// RFC 1624 eqn. 3: the new checksum after a 16-bit word of the covered data changes from `old`
/// to `new`. `HC' = ~(~HC + ~m + m')`.
pub fn update16(csum: u16, old: u16, new: u16) -> u16 {
    let s = u64::from(!csum) + u64::from(!old) + u64::from(new);
    !fold64(s)
}

/// As [`update16`] for a 32-bit field (an IPv4 address).
pub fn update32(csum: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let s = u64::from(!csum)
        + u64::from(!u16::from_be_bytes([old[0], old[1]]))
        + u64::from(!u16::from_be_bytes([old[2], old[3]]))
        + u64::from(u16::from_be_bytes([new[0], new[1]]))
        + u64::from(u16::from_be_bytes([new[2], new[3]]));
    !fold64(s)
}

/// UDP's variant of an incremental update: a zero field means "no checksum" and stays zero; a
/// computed zero is sent as `0xffff` (RFC 768).
pub fn update_udp16(csum: u16, old: u16, new: u16) -> u16 {
    if csum == 0 {
        return 0;
    }
    match update16(csum, old, new) {
        0 => 0xffff,
        c => c,
    }
}

/// UDP's variant of [`update32`].
pub fn update_udp32(csum: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    if csum == 0 {
        return 0;
    }
    match update32(csum, old, new) {
        0 => 0xffff,
        c => c,
    }
}

/// Offset of the checksum field inside the L4 header, for protocols whose checksum covers the
/// pseudo-header.
pub fn l4_checksum_offset(proto: u8) -> Option<usize> {
    match proto {
        proto::TCP => Some(tcp::CHECKSUM_OFFSET),
        proto::UDP => Some(udp::CHECKSUM_OFFSET),
        _ => None,
    }
}

/// Whether the packet's TCP/UDP checksum field holds only its folded pseudo-header sum
/// (CHECKSUM_PARTIAL). A complete checksum that happens to equal that sum reads as partial (one
/// packet in 65536 at random); completing it again is still correct.
pub fn is_partial(frame: &Frame<'_>, p: &Parsed) -> bool {
    let Some(co) = l4_checksum_offset(p.proto) else {
        return false;
    };
    get16(frame.head(), p.l4_off + co)
        == Some(pseudo_header_folded(p.src, p.dst, p.proto, p.l4_len as u16))
}

/// If the TCP/UDP checksum is partial (the field holds the folded pseudo-header sum, as veth
/// delivers CHECKSUM_PARTIAL frames), replace it with the full checksum, walking the whole chain.
/// A complete checksum that happens to equal that sum is recomputed too, which is still correct.
/// Returns whether it computed.
pub fn complete_partial(frame: &mut Frame<'_>, p: &Parsed) -> bool {
    if !is_partial(frame, p) {
        return false;
    }
    let Some(co) = l4_checksum_offset(p.proto) else {
        return false;
    };
    let at = p.l4_off + co;
    let l4_len = p.l4_len as u16;
    let pseudo = pseudo_header_sum(p.src, p.dst, p.proto, l4_len);
    let mut c = l4_full(frame, p.l4_off, p.l4_len, co, pseudo);
    if p.proto == proto::UDP && c == 0 {
        c = 0xffff;
    }
    set16(frame.head_mut(), at, c);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The IPv4 header of RFC 1071's usual worked example (checksum 0xb861).
    const IPV4_HDR: [u8; 20] = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];

    #[test]
    fn ipv4_header_checksum_matches_known_value() {
        assert_eq!(checksum(&IPV4_HDR), 0xb861);
    }

    #[test]
    fn odd_lengths_carry_across_chunks() {
        let data: Vec<u8> = (0..37u8).collect();
        let mut c = Checksum::new();
        c.add_bytes(&data[..5]);
        c.add_bytes(&data[5..6]);
        c.add_bytes(&data[6..]);
        assert_eq!(c.finish(), checksum(&data));
    }

    fn verifies(data: &[u8]) -> bool {
        checksum(data) == 0
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Every incremental update of a 16-bit word equals recomputation.
        #[test]
        fn incremental16_equals_recompute(mut data in proptest::collection::vec(any::<u8>(), 4..64),
                                          word in 0usize..31, new in any::<u16>()) {
            let len = data.len() & !1;
            data.truncate(len);
            let i = 2 + 2 * (word % ((len - 2) / 2));
            data[0] = 0; data[1] = 0;
            let c = checksum(&data);
            data[..2].copy_from_slice(&c.to_be_bytes());
            prop_assert!(verifies(&data));
            let old = u16::from_be_bytes([data[i], data[i + 1]]);
            data[i..i + 2].copy_from_slice(&new.to_be_bytes());
            let upd = update16(c, old, new);
            data[..2].copy_from_slice(&upd.to_be_bytes());
            prop_assert!(verifies(&data));
            data[0] = 0; data[1] = 0;
            let full = checksum(&data);
            // one's complement has two zeros; both verify, and RFC 1624 never yields 0xffff->0 issues
            prop_assert!(upd == full || (upd, full) == (0xffff, 0) || (upd, full) == (0, 0xffff));
        }

        /// Every incremental update of a 32-bit address equals recomputation, also for UDP.
        #[test]
        fn incremental32_equals_recompute(mut data in proptest::collection::vec(any::<u8>(), 8..64),
                                          new in any::<[u8; 4]>()) {
            let len = data.len() & !1;
            data.truncate(len);
            data[0] = 0; data[1] = 0;
            let c = checksum(&data);
            let old = [data[2], data[3], data[4], data[5]];
            data[2..6].copy_from_slice(&new);
            let upd = update32(c, old, new);
            data[..2].copy_from_slice(&upd.to_be_bytes());
            prop_assert!(verifies(&data));
            let udp = update_udp32(if c == 0 { 0xffff } else { c }, old, new);
            data[..2].copy_from_slice(&udp.to_be_bytes());
            prop_assert!(verifies(&data) && udp != 0);
        }

        /// A full L4 checksum over any split into a chain equals the contiguous one.
        #[test]
        fn chain_checksum_equals_contiguous(data in proptest::collection::vec(any::<u8>(), 8..200),
                                            cut1 in 0usize..200, cut2 in 0usize..200) {
            let n = data.len();
            let (a, b) = (cut1.min(n).max(8), cut2.min(n));
            let (a, b) = (a.min(b.max(a)), b.max(a));
            let mut head = data[..a].to_vec();
            let t1 = data[a..b].to_vec();
            let t2 = data[b..].to_vec();
            let tail: [&[u8]; 2] = [&t1, &t2];
            let f = Frame::new(&mut head, 0, a).with_tail(&tail);
            let chained = l4_full(&f, 0, n, 6, 1234);
            let mut flat = data.clone();
            flat[6] = 0; flat[7] = 0;
            let mut c = Checksum::new();
            c.add_u32(1234);
            c.add_bytes(&flat);
            prop_assert_eq!(chained, c.finish());
        }
    }
}
