//! VXLAN header (RFC 7348): flags with the I bit, 24-bit VNI.

use super::{WireError, be32, put32};

/// Header length.
pub const HEADER_LEN: usize = 8;
/// The I flag: the VNI is valid.
pub const FLAG_I: u8 = 0x08;

mod field {
    pub const FLAGS: usize = 0;
    pub const VNI: usize = 4; // 24 bits then one reserved byte
}

/// A view over a VXLAN header and the inner frame after it.
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
    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS]
    }
    pub fn vni(&self) -> u32 {
        be32(self.buffer.as_ref(), field::VNI) >> 8
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    pub fn set_vni(&mut self, vni: u32) {
        put32(self.buffer.as_mut(), field::VNI, (vni & 0x00ff_ffff) << 8);
    }
}

/// A VXLAN header to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Repr {
    pub vni: u32,
}

impl Repr {
    pub fn emit(&self, buf: &mut [u8]) -> Result<(), WireError> {
        let b = buf.get_mut(..HEADER_LEN).ok_or(WireError::Truncated)?;
        b.copy_from_slice(&[FLAG_I, 0, 0, 0, 0, 0, 0, 0]);
        Packet { buffer: b }.set_vni(self.vni);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static HDR: [u8; 8] = [0x08, 0, 0, 0, 0, 0, 1, 0];

    #[test]
    fn parse_and_emit_roundtrip() {
        let p = Packet::new_checked(&HDR[..]).unwrap();
        assert_eq!((p.flags(), p.vni()), (FLAG_I, 1));
        let mut out = [0xffu8; 8];
        Repr { vni: 1 }.emit(&mut out).unwrap();
        assert_eq!(out, HDR);
    }
}
