//! IPv4 header, options included (the view covers `IHL * 4` bytes), fragment fields flagged.
//! Setters of addresses and TTL update the header checksum incrementally (RFC 1624).

use super::{WireError, be16, put16};
use crate::checksum;

/// Length of a header without options.
pub const MIN_HEADER_LEN: usize = 20;

/// Field offsets in the header.
pub mod field {
    use core::ops::Range;
    pub const VER_IHL: usize = 0;
    pub const TOS: usize = 1;
    pub const TOTAL_LEN: usize = 2;
    pub const IDENT: usize = 4;
    pub const FLAGS_FRAG: usize = 6;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: usize = 10;
    pub const SRC: Range<usize> = 12..16;
    pub const DST: Range<usize> = 16..20;
}

/// Don't Fragment flag in the flags/fragment-offset word.
pub const FLAG_DF: u16 = 0x4000;
/// More Fragments flag.
pub const FLAG_MF: u16 = 0x2000;
const FRAG_OFFSET_MASK: u16 = 0x1fff;

/// A view over an IPv4 header and what follows it.
#[derive(Debug)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Check the buffer holds the fixed header and the options its IHL declares, and that the
    /// version is 4 and IHL at least 5.
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let b = buffer.as_ref();
        if b.len() < MIN_HEADER_LEN {
            return Err(WireError::Truncated);
        }
        let ihl = usize::from(b[field::VER_IHL] & 0x0f) * 4;
        if b[field::VER_IHL] >> 4 != 4 || ihl < MIN_HEADER_LEN {
            return Err(WireError::Malformed);
        }
        if b.len() < ihl {
            return Err(WireError::Truncated);
        }
        Ok(Self { buffer })
    }
    fn b(&self) -> &[u8] {
        self.buffer.as_ref()
    }
    /// Header length in bytes, options included.
    pub fn header_len(&self) -> usize {
        usize::from(self.b()[field::VER_IHL] & 0x0f) * 4
    }
    pub fn tos(&self) -> u8 {
        self.b()[field::TOS]
    }
    pub fn total_len(&self) -> u16 {
        be16(self.b(), field::TOTAL_LEN)
    }
    pub fn ident(&self) -> u16 {
        be16(self.b(), field::IDENT)
    }
    pub fn dont_frag(&self) -> bool {
        be16(self.b(), field::FLAGS_FRAG) & FLAG_DF != 0
    }
    pub fn more_frags(&self) -> bool {
        be16(self.b(), field::FLAGS_FRAG) & FLAG_MF != 0
    }
    /// Fragment offset in bytes.
    pub fn frag_offset(&self) -> u16 {
        (be16(self.b(), field::FLAGS_FRAG) & FRAG_OFFSET_MASK) * 8
    }
    /// Whether this is a fragment at all (first or later).
    pub fn is_fragment(&self) -> bool {
        self.more_frags() || self.frag_offset() != 0
    }
    pub fn ttl(&self) -> u8 {
        self.b()[field::TTL]
    }
    pub fn protocol(&self) -> u8 {
        self.b()[field::PROTOCOL]
    }
    pub fn checksum(&self) -> u16 {
        be16(self.b(), field::CHECKSUM)
    }
    pub fn src(&self) -> [u8; 4] {
        let b = self.b();
        [b[12], b[13], b[14], b[15]]
    }
    pub fn dst(&self) -> [u8; 4] {
        let b = self.b();
        [b[16], b[17], b[18], b[19]]
    }
    /// Whether the header checksum verifies.
    pub fn verify_checksum(&self) -> bool {
        checksum::checksum(&self.b()[..self.header_len()]) == 0
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    fn bm(&mut self) -> &mut [u8] {
        self.buffer.as_mut()
    }
    fn set_checksum(&mut self, c: u16) {
        put16(self.bm(), field::CHECKSUM, c);
    }
    /// Set the source address, updating the header checksum.
    pub fn set_src(&mut self, a: [u8; 4]) {
        let c = checksum::update32(self.checksum(), self.src(), a);
        self.bm()[field::SRC].copy_from_slice(&a);
        self.set_checksum(c);
    }
    /// Set the destination address, updating the header checksum.
    pub fn set_dst(&mut self, a: [u8; 4]) {
        let c = checksum::update32(self.checksum(), self.dst(), a);
        self.bm()[field::DST].copy_from_slice(&a);
        self.set_checksum(c);
    }
    /// Decrement the TTL by one, updating the header checksum. The caller checks TTL > 1 first.
    pub fn decrement_ttl(&mut self) {
        let old = be16(self.b(), field::TTL);
        let new = old.wrapping_sub(0x0100);
        let c = checksum::update16(self.checksum(), old, new);
        put16(self.bm(), field::TTL, new);
        self.set_checksum(c);
    }
    /// Recompute the header checksum from scratch.
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let hl = self.header_len();
        let c = checksum::checksum(&self.b()[..hl]);
        self.set_checksum(c);
    }
    /// Set the identification field, updating the header checksum.
    pub fn set_ident(&mut self, id: u16) {
        let c = checksum::update16(self.checksum(), self.ident(), id);
        put16(self.bm(), field::IDENT, id);
        self.set_checksum(c);
    }
}

/// An option-less IPv4 header to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Repr {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub protocol: u8,
    pub tos: u8,
    pub ident: u16,
    pub dont_frag: bool,
    pub ttl: u8,
    /// Bytes after the header.
    pub payload_len: u16,
}

impl Repr {
    /// Write a 20-byte header with its checksum into the start of `buf`.
    pub fn emit(&self, buf: &mut [u8]) -> Result<(), WireError> {
        let b = buf.get_mut(..MIN_HEADER_LEN).ok_or(WireError::Truncated)?;
        b[field::VER_IHL] = 0x45;
        b[field::TOS] = self.tos;
        put16(
            b,
            field::TOTAL_LEN,
            self.payload_len.saturating_add(MIN_HEADER_LEN as u16),
        );
        put16(b, field::IDENT, self.ident);
        put16(
            b,
            field::FLAGS_FRAG,
            if self.dont_frag { FLAG_DF } else { 0 },
        );
        b[field::TTL] = self.ttl;
        b[field::PROTOCOL] = self.protocol;
        put16(b, field::CHECKSUM, 0);
        b[field::SRC].copy_from_slice(&self.src);
        b[field::DST].copy_from_slice(&self.dst);
        let c = checksum::checksum(b);
        put16(b, field::CHECKSUM, c);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ICMP echo from 10.244.1.2 to 10.244.2.3, DF, TTL 64, id 0x1234.
    static HDR: [u8; 20] = [
        0x45, 0x00, 0x00, 0x54, 0x12, 0x34, 0x40, 0x00, 0x40, 0x01, 0x00, 0x00, 10, 244, 1, 2, 10,
        244, 2, 3,
    ];

    fn golden() -> [u8; 20] {
        let mut h = HDR;
        let c = checksum::checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    }

    #[test]
    fn parse_fields() {
        let h = golden();
        let p = Packet::new_checked(&h[..]).unwrap();
        assert!(p.verify_checksum());
        assert_eq!(p.header_len(), 20);
        assert_eq!(p.total_len(), 84);
        assert!(p.dont_frag() && !p.is_fragment());
        assert_eq!((p.ttl(), p.protocol(), p.ident()), (64, 1, 0x1234));
        assert_eq!(p.src(), [10, 244, 1, 2]);
    }

    #[test]
    fn emit_matches_golden() {
        let r = Repr {
            src: [10, 244, 1, 2],
            dst: [10, 244, 2, 3],
            protocol: 1,
            tos: 0,
            ident: 0x1234,
            dont_frag: true,
            ttl: 64,
            payload_len: 64,
        };
        let mut out = [0u8; 20];
        r.emit(&mut out).unwrap();
        assert_eq!(out, golden());
    }

    #[test]
    fn setters_keep_checksum_valid() {
        let mut h = golden();
        let mut p = Packet::new_checked(&mut h[..]).unwrap();
        p.set_dst([10, 96, 0, 10]);
        p.set_src([1, 2, 3, 4]);
        p.decrement_ttl();
        p.set_ident(7);
        assert!(p.verify_checksum());
        assert_eq!(p.ttl(), 63);
    }

    #[test]
    fn options_and_fragments() {
        let mut h = [0u8; 24];
        h[..20].copy_from_slice(&golden());
        h[0] = 0x46;
        h[6] = 0x20; // MF, offset 0: first fragment
        let p = Packet::new_checked(&h[..]).unwrap();
        assert_eq!(p.header_len(), 24);
        assert!(p.is_fragment() && p.more_frags() && p.frag_offset() == 0);
        assert_eq!(
            Packet::new_checked(&h[..22]).unwrap_err(),
            WireError::Truncated
        );
        h[0] = 0x44;
        assert_eq!(
            Packet::new_checked(&h[..]).unwrap_err(),
            WireError::Malformed
        );
    }
}
