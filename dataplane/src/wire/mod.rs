//! Packet views, one file per header, shaped like smoltcp's `wire`: a `Packet<T: AsRef<[u8]>>`
//! view with named field offsets, readers through `from_be_bytes`, in-place setters, and a `Repr`
//! with `emit` where Sluice builds headers (VXLAN encap, ICMP errors).
//!
//! Contract: a view is created by `new_checked`, which checks the buffer is long enough for every
//! fixed field (and for IPv4/TCP, for the header length the packet declares); after that no
//! accessor panics. Semantic validation of IPv4, TCP and UDP headers is etherparse's (see
//! `crate::parse`), not repeated here.

pub mod ethernet;
pub mod icmp;
pub mod ipv4;
pub mod tcp;
pub mod udp;
pub mod vxlan;

/// Why a view could not be made over a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireError {
    /// The buffer is shorter than the header.
    Truncated,
    /// A length or version field is inconsistent with the buffer.
    Malformed,
}

pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

pub(crate) fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// A big-endian `u16` at `at`, or `None` past the end (for callers without a checked view).
pub fn get16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Write a big-endian `u16` at `at`; nothing past the end.
pub fn set16(b: &mut [u8], at: usize, v: u16) {
    if let Some(s) = b.get_mut(at..at + 2) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}
