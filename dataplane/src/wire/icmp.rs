//! ICMPv4: echo request/reply (the identifier is the flow's "port" for conntrack and NAT) and
//! errors (destination unreachable, time exceeded, parameter problem) that carry the IP header
//! and first 8 bytes of the offending datagram, which NAT translates too.

use super::{WireError, be16, put16};
use crate::checksum;

/// Length of the ICMP header (type, code, checksum, 4 bytes of rest-of-header).
pub const HEADER_LEN: usize = 8;

/// Message types the pipeline distinguishes.
pub mod kind {
    pub const ECHO_REPLY: u8 = 0;
    pub const DEST_UNREACHABLE: u8 = 3;
    pub const ECHO_REQUEST: u8 = 8;
    pub const TIME_EXCEEDED: u8 = 11;
    pub const PARAMETER_PROBLEM: u8 = 12;
}

/// Destination-unreachable code "fragmentation needed and DF set".
pub const CODE_FRAG_NEEDED: u8 = 4;

mod field {
    pub const TYPE: usize = 0;
    pub const CODE: usize = 1;
    pub const CHECKSUM: usize = 2;
    pub const ECHO_ID: usize = 4;
    pub const ECHO_SEQ: usize = 6;
    pub const NEXT_HOP_MTU: usize = 6;
}

/// A view over an ICMP message.
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
    pub fn msg_type(&self) -> u8 {
        self.buffer.as_ref()[field::TYPE]
    }
    pub fn code(&self) -> u8 {
        self.buffer.as_ref()[field::CODE]
    }
    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), field::CHECKSUM)
    }
    /// Whether this is an echo request or reply.
    pub fn is_echo(&self) -> bool {
        matches!(self.msg_type(), kind::ECHO_REQUEST | kind::ECHO_REPLY)
    }
    /// Whether this is an error that embeds the offending datagram's header.
    pub fn is_error(&self) -> bool {
        matches!(
            self.msg_type(),
            kind::DEST_UNREACHABLE | kind::TIME_EXCEEDED | kind::PARAMETER_PROBLEM
        )
    }
    pub fn echo_id(&self) -> u16 {
        be16(self.buffer.as_ref(), field::ECHO_ID)
    }
    pub fn echo_seq(&self) -> u16 {
        be16(self.buffer.as_ref(), field::ECHO_SEQ)
    }
    pub fn next_hop_mtu(&self) -> u16 {
        be16(self.buffer.as_ref(), field::NEXT_HOP_MTU)
    }
    /// The bytes after the 8-byte header (for errors: the embedded IP header and 8 bytes).
    pub fn data(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    pub fn set_checksum(&mut self, c: u16) {
        put16(self.buffer.as_mut(), field::CHECKSUM, c);
    }
    /// Set the echo identifier, updating the checksum.
    pub fn set_echo_id(&mut self, id: u16) {
        let c = checksum::update16(self.checksum(), self.echo_id(), id);
        put16(self.buffer.as_mut(), field::ECHO_ID, id);
        self.set_checksum(c);
    }
    /// The embedded datagram, writable.
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[HEADER_LEN..]
    }
    /// Recompute the checksum over the whole message in this buffer.
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let c = checksum::checksum(self.buffer.as_ref());
        self.set_checksum(c);
    }
}

/// An ICMP header to build; `rest` is the 4-byte rest-of-header (echo id/seq, or unused and
/// next-hop MTU). The checksum is computed by the caller over the message ([`Packet::fill_checksum`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Repr {
    pub msg_type: u8,
    pub code: u8,
    pub rest: [u8; 4],
}

impl Repr {
    /// An echo request or reply header.
    pub fn echo(msg_type: u8, id: u16, seq: u16) -> Self {
        let [a, b] = id.to_be_bytes();
        let [c, d] = seq.to_be_bytes();
        Self {
            msg_type,
            code: 0,
            rest: [a, b, c, d],
        }
    }
    /// A "fragmentation needed" error header announcing `mtu`.
    pub fn frag_needed(mtu: u16) -> Self {
        let [a, b] = mtu.to_be_bytes();
        Self {
            msg_type: kind::DEST_UNREACHABLE,
            code: CODE_FRAG_NEEDED,
            rest: [0, 0, a, b],
        }
    }
    pub fn emit(&self, buf: &mut [u8]) -> Result<(), WireError> {
        let b = buf.get_mut(..HEADER_LEN).ok_or(WireError::Truncated)?;
        b[field::TYPE] = self.msg_type;
        b[field::CODE] = self.code;
        put16(b, field::CHECKSUM, 0);
        b[4..8].copy_from_slice(&self.rest);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Echo request id 0x0102 seq 1, payload "abcd", with its checksum.
    fn echo() -> [u8; 12] {
        let mut m = [8u8, 0, 0, 0, 1, 2, 0, 1, b'a', b'b', b'c', b'd'];
        let c = checksum::checksum(&m);
        m[2..4].copy_from_slice(&c.to_be_bytes());
        m
    }

    #[test]
    fn echo_parse_emit_and_set_id() {
        let mut m = echo();
        let mut built = [0u8; 12];
        Repr::echo(kind::ECHO_REQUEST, 0x0102, 1)
            .emit(&mut built)
            .unwrap();
        built[8..].copy_from_slice(b"abcd");
        Packet::new_checked(&mut built[..]).unwrap().fill_checksum();
        assert_eq!(built, m);
        let mut p = Packet::new_checked(&mut m[..]).unwrap();
        assert!(p.is_echo() && !p.is_error());
        assert_eq!((p.echo_id(), p.echo_seq()), (0x0102, 1));
        p.set_echo_id(0xbeef);
        assert_eq!(checksum::checksum(&m), 0);
    }

    #[test]
    fn frag_needed_error() {
        let mut m = [0u8; 8 + 28];
        Repr::frag_needed(1450).emit(&mut m).unwrap();
        let p = Packet::new_checked(&m[..]).unwrap();
        assert!(p.is_error());
        assert_eq!((p.code(), p.next_hop_mtu(), p.data().len()), (4, 1450, 28));
    }
}
