//! Ethernet II header (no VLAN tags: tagged frames are passed to the kernel by `parse`).

use super::{WireError, be16, put16};

/// Header length.
pub const HEADER_LEN: usize = 14;

/// EtherTypes the pipeline distinguishes.
pub mod ethertype {
    pub const IPV4: u16 = 0x0800;
    pub const ARP: u16 = 0x0806;
    pub const VLAN: u16 = 0x8100;
    pub const IPV6: u16 = 0x86dd;
}

mod field {
    use core::ops::Range;
    pub const DST: Range<usize> = 0..6;
    pub const SRC: Range<usize> = 6..12;
    pub const ETHERTYPE: usize = 12;
}

/// A MAC address.
pub type Mac = [u8; 6];

/// A view over an Ethernet frame.
#[derive(Debug)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Check the buffer holds a full header.
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        if buffer.as_ref().len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        Ok(Self { buffer })
    }
    pub fn dst(&self) -> Mac {
        let mut m = [0; 6];
        m.copy_from_slice(&self.buffer.as_ref()[field::DST]);
        m
    }
    pub fn src(&self) -> Mac {
        let mut m = [0; 6];
        m.copy_from_slice(&self.buffer.as_ref()[field::SRC]);
        m
    }
    pub fn ethertype(&self) -> u16 {
        be16(self.buffer.as_ref(), field::ETHERTYPE)
    }
    /// The bytes after the header.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    pub fn set_dst(&mut self, mac: Mac) {
        self.buffer.as_mut()[field::DST].copy_from_slice(&mac);
    }
    pub fn set_src(&mut self, mac: Mac) {
        self.buffer.as_mut()[field::SRC].copy_from_slice(&mac);
    }
    pub fn set_ethertype(&mut self, t: u16) {
        put16(self.buffer.as_mut(), field::ETHERTYPE, t);
    }
}

/// An Ethernet header to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Repr {
    pub dst: Mac,
    pub src: Mac,
    pub ethertype: u16,
}

impl Repr {
    /// Write the header into the first [`HEADER_LEN`] bytes of `buf` (which must be that long).
    pub fn emit(&self, buf: &mut [u8]) -> Result<(), WireError> {
        let mut p = Packet::new_checked(buf)?;
        p.set_dst(self.dst);
        p.set_src(self.src);
        p.set_ethertype(self.ethertype);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static FRAME: [u8; 14] = [0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];

    #[test]
    fn parse_and_emit_roundtrip() {
        let p = Packet::new_checked(&FRAME[..]).unwrap();
        let r = Repr {
            dst: p.dst(),
            src: p.src(),
            ethertype: p.ethertype(),
        };
        assert_eq!(r.ethertype, ethertype::IPV4);
        assert_eq!(r.dst, [2, 0, 0, 0, 0, 1]);
        let mut out = [0u8; 14];
        r.emit(&mut out).unwrap();
        assert_eq!(out, FRAME);
        assert_eq!(
            Packet::new_checked(&FRAME[..13]).unwrap_err(),
            WireError::Truncated
        );
    }
}
