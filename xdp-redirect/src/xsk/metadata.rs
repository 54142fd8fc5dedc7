//! AF_XDP TX metadata (Linux 6.8+): bytes in front of a tx descriptor's data
//! that ask the kernel for checksum offload, so that a copy-mode skb leaves
//! CHECKSUM_PARTIAL (`xsk_build_skb` -> `xsk_skb_metadata` in
//! `net/xdp/xsk.c`) and a veth delivers it as such: the pod's stack does not
//! verify the L4 checksum, and the sender need not compute it.
//!
//! Registration: the UMEM is registered with `tx_metadata_len` =
//! [`TX_METADATA_LEN`] and the `XDP_UMEM_TX_METADATA_LEN` flag (required
//! since 6.11, commit d5e726d9143c; kernels that do not know the flag refuse
//! the registration with EINVAL and the UMEM is registered without).
//!
//! Layout of a chunk (aligned mode), offsets from the chunk start:
//!
//! ```text
//!  0            addr-24      addr                         addr+len
//!  | headroom   | metadata    | data (the frame)           | tailroom |
//!               | flags u64 | csum_start u16 | csum_offset u16 | pad | launch_time u64 |
//! ```
//!
//! * The kernel reads the metadata at `addr - tx_metadata_len` and, with a
//!   UMEM registered with metadata, refuses (as an invalid descriptor, the
//!   chunk never completes) every tx descriptor whose data starts less than
//!   `tx_metadata_len` bytes into its chunk, with or without the
//!   `XDP_TX_METADATA` option (`xp_aligned_validate_desc`): so bounds are
//!   kept at or after [`TX_METADATA_LEN`], and [`super::Xsk::send_copy`]
//!   writes a chunk's data from there.
//! * RX data starts at `XDP_PACKET_HEADROOM (256) + headroom` (320 by
//!   default); a VXLAN push moves it 50 bytes to the front (270); the 24
//!   metadata bytes still fit in front (246..270), with any headroom.
//! * Only the first descriptor of a packet carries the request
//!   (`XDP_TX_METADATA` in its options); `csum_start` counts from the start
//!   of the packet data, and `csum_start + csum_offset + 2` must lie inside
//!   the first descriptor's data. The kernel answers a request outside it
//!   with EINVAL from `sendto`, without consuming the descriptor, so the tx
//!   ring would stall on it: requests are checked when made and again when
//!   the packet is queued.
//! * Zero-copy: the driver must implement the AF_XDP checksum request
//!   (`xsk_tx_metadata_ops`; netdev `xsk-features` `tx-checksum`), which is
//!   not queried here, so [`super::Xsk::tx_checksum_offload`] is false in
//!   zero-copy mode.

use std::io;

use super::{BindMode, VXLAN_ENCAP_LEN, XDP_PACKET_HEADROOM, Xsk};

/// Bytes of metadata in front of every tx descriptor's data: `sizeof(struct
/// xsk_tx_metadata)` in `include/uapi/linux/if_xdp.h` (`__u64 flags` and a
/// union of `request { __u16 csum_start; __u16 csum_offset; __u64
/// launch_time; }` and `completion { __u64 tx_timestamp; }`); the kernel
/// wants a multiple of 8 below 256.
pub const TX_METADATA_LEN: u32 = 24;

// flags, then the union's largest member (csum_start, csum_offset, pad,
// launch_time); the kernel wants a multiple of 8.
const _: () = assert!(TX_METADATA_LEN == 8 + 2 + 2 + 4 + 8 && TX_METADATA_LEN.is_multiple_of(8));
// With no UMEM headroom at all, rx data pushed by a VXLAN header still has
// the metadata room in front.
const _: () = assert!(XDP_PACKET_HEADROOM - VXLAN_ENCAP_LEN >= TX_METADATA_LEN);

/// `XDP_TXMD_FLAGS_CHECKSUM` in `struct xsk_tx_metadata`'s `flags`.
const FLAGS_CHECKSUM: u64 = libc::XDP_TXMD_FLAGS_CHECKSUM as u64;
/// Where `request.csum_start` and `request.csum_offset` are in the metadata.
const CSUM_START: usize = 8;
const CSUM_OFFSET: usize = 10;

/// Whether the UMEM has room for tx metadata, and why not.
#[derive(Debug)]
pub enum TxMetadata {
    /// Registered with `len` bytes of metadata in front of every tx
    /// descriptor's data.
    Registered {
        /// `tx_metadata_len`.
        len: u32,
    },
    /// Not asked for ([`super::XskConfig::tx_metadata`] is false).
    Disabled,
    /// The kernel refused the registration with metadata (before Linux 6.8,
    /// or without `XDP_UMEM_TX_METADATA_LEN`): registered without.
    Unsupported(io::Error),
}

impl TxMetadata {
    /// `tx_metadata_len` as registered (0 without metadata).
    pub fn len(&self) -> u32 {
        match self {
            Self::Registered { len } => *len,
            Self::Disabled | Self::Unsupported(_) => 0,
        }
    }

    /// True without metadata.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a checksum offload request was refused (the packet is unchanged).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChecksumError {
    /// This UMEM cannot ask for checksum offload (see
    /// [`super::Xsk::tx_checksum_offload`]).
    #[error("no tx checksum offload on this UMEM")]
    Unsupported,
    /// `csum_start + csum_offset + 2` exceed the packet's data in its first
    /// chunk.
    #[error("the checksum field lies outside the first chunk's data")]
    OutOfData,
    /// The batch has no packet with this index.
    #[error("no packet with this index in the batch")]
    NoSuchPacket,
}

/// A checksum offload request: the kernel sums from `start` (from the
/// start of the packet data) to the end of the packet and stores the result
/// at `start + offset`; the field must hold the pseudo-header sum, as
/// CHECKSUM_PARTIAL wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TxChecksum {
    start: u16,
    offset: u16,
}

impl TxChecksum {
    /// A request for a packet whose first chunk holds `data_len` bytes.
    pub(super) fn new(start: u16, offset: u16, data_len: usize) -> Result<Self, ChecksumError> {
        let c = Self { start, offset };
        if c.fits(data_len) {
            Ok(c)
        } else {
            Err(ChecksumError::OutOfData)
        }
    }

    /// True if the checksum field lies inside the first `data_len` bytes
    /// (the kernel's test in `xsk_skb_metadata`).
    pub(super) fn fits(&self, data_len: usize) -> bool {
        usize::from(self.start) + usize::from(self.offset) + 2 <= data_len
    }

    /// Writes the request as `struct xsk_tx_metadata` (native byte order,
    /// as the kernel reads it) into `meta`, the [`TX_METADATA_LEN`] bytes in
    /// front of the packet data. A shorter `meta` is left alone.
    pub(super) fn write(&self, meta: &mut [u8]) {
        let Some(meta) = meta.get_mut(..TX_METADATA_LEN as usize) else {
            return;
        };
        meta.fill(0);
        meta[..8].copy_from_slice(&FLAGS_CHECKSUM.to_ne_bytes());
        meta[CSUM_START..CSUM_START + 2].copy_from_slice(&self.start.to_ne_bytes());
        meta[CSUM_OFFSET..CSUM_OFFSET + 2].copy_from_slice(&self.offset.to_ne_bytes());
    }
}

impl Xsk {
    /// Whether the UMEM has room for tx metadata, and if not why (for the
    /// agent's log).
    pub fn tx_metadata(&self) -> &TxMetadata {
        &self.tx_metadata
    }

    /// True if packets can leave with their L4 checksum left to the kernel
    /// ([`super::RxBatch::set_tx_checksum`],
    /// [`Xsk::send_copy_with_checksum`]): the UMEM has tx metadata and the
    /// sockets are in copy mode (the kernel builds a CHECKSUM_PARTIAL skb,
    /// which the device or `skb_checksum_help` completes, or a veth hands on
    /// as it is). False in zero-copy mode (see the module doc).
    pub fn tx_checksum_offload(&self) -> bool {
        !self.tx_metadata.is_empty() && self.cfg.bind_mode == BindMode::Copy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_written_as_struct_xsk_tx_metadata() {
        let c = TxChecksum::new(34, 6, 42).unwrap();
        let mut meta = [0xffu8; 24];
        c.write(&mut meta);
        assert_eq!(u64::from_ne_bytes(meta[..8].try_into().unwrap()), 2);
        assert_eq!(u16::from_ne_bytes([meta[8], meta[9]]), 34);
        assert_eq!(u16::from_ne_bytes([meta[10], meta[11]]), 6);
        assert!(meta[12..].iter().all(|b| *b == 0), "no launch time");
        let mut short = [0xffu8; 23];
        c.write(&mut short);
        assert!(short.iter().all(|b| *b == 0xff));
    }

    #[test]
    fn the_checksum_field_must_lie_in_the_first_chunk() {
        // UDP behind 14 + 20 bytes: the field is bytes 40..42.
        assert_eq!(TxChecksum::new(34, 6, 42).map(|c| c.fits(42)), Ok(true));
        assert_eq!(TxChecksum::new(34, 6, 41), Err(ChecksumError::OutOfData));
        assert_eq!(TxChecksum::new(34, 16, 54).map(|_| ()), Ok(()));
        assert_eq!(
            TxChecksum::new(u16::MAX, u16::MAX, 4096),
            Err(ChecksumError::OutOfData)
        );
    }
}
