//! UDP header: ports and checksum in place (NAT), a `Repr` to build the VXLAN outer header.

use super::{WireError, be16, put16};

/// Header length.
pub const HEADER_LEN: usize = 8;
/// Offset of the checksum field.
pub const CHECKSUM_OFFSET: usize = 6;

mod field {
    pub const SRC_PORT: usize = 0;
    pub const DST_PORT: usize = 2;
    pub const LENGTH: usize = 4;
    pub const CHECKSUM: usize = super::CHECKSUM_OFFSET;
}

/// A view over a UDP datagram.
#[derive(Debug)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        if buffer.as_ref().len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        Ok(Self { buffer })
    }
    pub fn src_port(&self) -> u16 {
        be16(self.buffer.as_ref(), field::SRC_PORT)
    }
    pub fn dst_port(&self) -> u16 {
        be16(self.buffer.as_ref(), field::DST_PORT)
    }
    pub fn length(&self) -> u16 {
        be16(self.buffer.as_ref(), field::LENGTH)
    }
    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), field::CHECKSUM)
    }
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    pub fn set_src_port(&mut self, p: u16) {
        put16(self.buffer.as_mut(), field::SRC_PORT, p);
    }
    pub fn set_dst_port(&mut self, p: u16) {
        put16(self.buffer.as_mut(), field::DST_PORT, p);
    }
    pub fn set_checksum(&mut self, c: u16) {
        put16(self.buffer.as_mut(), field::CHECKSUM, c);
    }
}

/// A UDP header to build. The checksum is written as given (0 = none, as VXLAN with
/// `noudpcsum`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Repr {
    pub src_port: u16,
    pub dst_port: u16,
    /// Bytes after the header.
    pub payload_len: u16,
    pub checksum: u16,
}

impl Repr {
    pub fn emit(&self, buf: &mut [u8]) -> Result<(), WireError> {
        let b = buf.get_mut(..HEADER_LEN).ok_or(WireError::Truncated)?;
        put16(b, field::SRC_PORT, self.src_port);
        put16(b, field::DST_PORT, self.dst_port);
        put16(
            b,
            field::LENGTH,
            self.payload_len.saturating_add(HEADER_LEN as u16),
        );
        put16(b, field::CHECKSUM, self.checksum);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static HDR: [u8; 8] = [0xd4, 0x31, 0x21, 0x18, 0x00, 0x3a, 0, 0];

    #[test]
    fn parse_and_emit_roundtrip() {
        let p = Packet::new_checked(&HDR[..]).unwrap();
        assert_eq!((p.src_port(), p.dst_port(), p.length()), (54321, 8472, 58));
        let r = Repr {
            src_port: 54321,
            dst_port: 8472,
            payload_len: 50,
            checksum: 0,
        };
        let mut out = [0xffu8; 8];
        r.emit(&mut out).unwrap();
        assert_eq!(out, HDR);
        assert!(Packet::new_checked(&HDR[..7]).is_err());
    }
}
