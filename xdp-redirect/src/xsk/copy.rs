//! Frames that do not live in this UMEM leave through one of its sockets as
//! copies: [`Xsk::send_copy`] writes the bytes into free chunks and queues
//! them like a forwarded packet; [`Xsk::send_copy_with_checksum`] also asks
//! the kernel to complete the L4 checksum.
//!
//! Guarantees: all or nothing (on error no chunk is taken and nothing is
//! queued); no allocation, no syscall. A chunk's data starts after the tx
//! metadata room ([`super::TX_METADATA_LEN`] bytes when the UMEM has
//! metadata, else 0), so a chunk carries `frame_size` minus that.

use libxdp_sys::xdp_desc;

use super::metadata::{ChecksumError, TxChecksum};
use super::umem::Memory;
use super::{MAX_SEGMENTS, SocketId, Xsk};

/// Why [`Xsk::send_copy`] did not queue a frame (per packet: small and `Copy`; the frame is
/// simply not sent and nothing is taken from the UMEM).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The socket id does not name an open socket.
    #[error("no open AF_XDP socket with this id")]
    NoSuchSocket,
    /// The frame has no bytes.
    #[error("the frame is empty")]
    Empty,
    /// The frame needs more chunks than one packet may span ([`MAX_SEGMENTS`], or one chunk
    /// without multi-buffer).
    #[error("the frame spans more chunks than one packet may")]
    TooLarge,
    /// The free list has fewer chunks than the frame needs.
    #[error("not enough free chunks in the UMEM")]
    NoFreeChunks,
    /// The socket's tx queue has no room for the frame's descriptors.
    #[error("the socket's tx queue is full")]
    QueueFull,
}

/// Why [`Xsk::send_copy_with_checksum`] did not queue a frame (nothing is taken from the UMEM).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendChecksumError {
    /// As for [`Xsk::send_copy`].
    #[error(transparent)]
    Send(#[from] SendError),
    /// The checksum offload request was refused.
    #[error("checksum offload: {0}")]
    Checksum(#[from] ChecksumError),
}

/// Chunks a frame of `len` bytes takes when each chunk carries `per_chunk` bytes and a packet may
/// span `max_segments` chunks.
pub fn chunks_for(len: usize, per_chunk: usize, max_segments: usize) -> Result<usize, SendError> {
    if len == 0 {
        return Err(SendError::Empty);
    }
    let n = len.div_ceil(per_chunk.max(1));
    if n > max_segments {
        return Err(SendError::TooLarge);
    }
    Ok(n)
}

impl Xsk {
    /// Queues a copy of a frame for transmission on `to`: the bytes of `parts`, in order, are
    /// written into chunks taken from the free list (each filled from the end of the tx metadata
    /// room, chained with `XDP_PKT_CONTD` when the frame spans several) and queued like a
    /// forwarded packet; the next [`Xsk::flush`] puts them on the tx ring and the completions
    /// bring the chunks back. On error nothing is taken and nothing is queued (a full queue
    /// counts in `tx_queue_full`).
    ///
    /// This is how a frame that lives outside this UMEM (handed over by another worker) leaves
    /// through one of this UMEM's sockets. No allocation, no syscall.
    pub fn send_copy(&mut self, to: SocketId, parts: &[&[u8]]) -> Result<(), SendError> {
        self.queue_copy(to, parts, None)
    }

    /// Bytes of a frame each chunk of a copy carries: a chunk minus the tx metadata room.
    fn copy_chunk_len(&self) -> usize {
        self.cfg.frame_size as usize - self.mem.tx_metadata_len
    }

    /// [`Self::send_copy`], asking the kernel to complete the frame's L4 checksum as
    /// [`super::RxBatch::set_tx_checksum`] does for a forwarded packet: from `csum_start` (from
    /// the start of the frame) to the end, stored at `csum_start + csum_offset`, a field that
    /// holds the pseudo-header sum and lies in the first chunk. Requires
    /// [`Xsk::tx_checksum_offload`].
    pub fn send_copy_with_checksum(
        &mut self,
        to: SocketId,
        parts: &[&[u8]],
        csum_start: u16,
        csum_offset: u16,
    ) -> Result<(), SendChecksumError> {
        if !self.tx_checksum_offload() {
            return Err(ChecksumError::Unsupported.into());
        }
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let first = len.min(self.copy_chunk_len());
        let csum = TxChecksum::new(csum_start, csum_offset, first)?;
        Ok(self.queue_copy(to, parts, Some(csum))?)
    }

    fn queue_copy(
        &mut self,
        to: SocketId,
        parts: &[&[u8]],
        csum: Option<TxChecksum>,
    ) -> Result<(), SendError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let room = self.mem.tx_metadata_len;
        let per = self.copy_chunk_len();
        let segs = chunks_for(len, per, self.max_segments())?;
        let spread = Spread {
            len,
            first: room,
            room,
            chunk: self.cfg.frame_size as usize,
        };
        let Self {
            sockets, mem, free, ..
        } = self;
        let sock = sockets
            .get_mut(to.0 as usize)
            .and_then(Option::as_mut)
            .ok_or(SendError::NoSuchSocket)?;
        if sock.pending.len() + segs > sock.pending_cap {
            sock.stats.tx_queue_full += 1;
            return Err(SendError::QueueFull);
        }
        if free.len() < segs {
            return Err(SendError::NoFreeChunks);
        }
        let mut addrs = [0u64; MAX_SEGMENTS];
        for a in &mut addrs[..segs] {
            // Checked above: the free list holds at least `segs` chunks.
            *a = free.pop().unwrap_or_default();
        }
        let addrs = &addrs[..segs];
        // SAFETY: the chunks were just taken off the free list: in no ring,
        // no batch, not lent; and no `FrameMut` is alive (they borrow the
        // `Xsk`, which `&mut self` excludes).
        unsafe { scatter(mem, addrs, spread, parts) };
        let mut first_options = 0;
        if let Some(c) = csum {
            // SAFETY: as above; the slices of `scatter` are gone.
            let chunk = unsafe { mem.chunk_mut(addrs[0]) };
            c.write(chunk.get_mut(..room).unwrap_or_default());
            first_options = libc::XDP_TX_METADATA;
        }
        for (k, d) in spread.descs(addrs).enumerate() {
            let options = d.options | if k == 0 { first_options } else { 0 };
            sock.pending.push_back(xdp_desc { options, ..d });
        }
        sock.tx_out += segs as u64;
        sock.stats.tx_copied += 1;
        Ok(())
    }
}

/// How `len` bytes lie in a chain of chunks of `chunk` bytes: from offset
/// `first` in the first chunk and from `room` (the tx metadata room) in each
/// further one, every chunk but the last filled to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Spread {
    pub(super) len: usize,
    pub(super) first: usize,
    pub(super) room: usize,
    pub(super) chunk: usize,
}

impl Spread {
    /// Chunks the bytes take (0 for none).
    pub(super) fn chunks(&self) -> usize {
        if self.len == 0 {
            return 0;
        }
        let head = self.chunk.saturating_sub(self.first);
        let per = self.chunk.saturating_sub(self.room).max(1);
        1 + self.len.saturating_sub(head).div_ceil(per)
    }

    /// Offset in its chunk and length of the bytes in chunk `k`.
    fn segment(&self, k: usize) -> (usize, usize) {
        let head = self.chunk.saturating_sub(self.first);
        if k == 0 {
            return (self.first, self.len.min(head));
        }
        let per = self.chunk.saturating_sub(self.room);
        let before = head + (k - 1) * per;
        (self.room, self.len.saturating_sub(before).min(per))
    }

    /// The descriptors of the bytes in the chunks `addrs` (chunk base
    /// addresses, one per [`Self::chunks`]), chained with `XDP_PKT_CONTD`.
    pub(super) fn descs<'s>(&'s self, addrs: &'s [u64]) -> impl Iterator<Item = xdp_desc> + 's {
        let last = addrs.len().saturating_sub(1);
        addrs.iter().enumerate().map(move |(k, addr)| {
            let (off, len) = self.segment(k);
            xdp_desc {
                addr: addr + off as u64,
                len: len as u32,
                options: if k < last { libc::XDP_PKT_CONTD } else { 0 },
            }
        })
    }
}

/// Copies the bytes of `parts`, in order, into the chunks `addrs` (chunk
/// base addresses of `mem`) as `spread` lays them out; bytes past the last
/// chunk are left out.
///
/// # Safety
/// Nothing else references any chunk of `addrs` during the call (see
/// [`Memory::chunk_mut`]; one chunk is written at a time, so a chunk named
/// twice is only written twice).
pub(super) unsafe fn scatter(mem: &Memory, addrs: &[u64], spread: Spread, parts: &[&[u8]]) {
    let mut bytes = parts.iter().flat_map(|p| p.chunks(64));
    let mut pending: &[u8] = &[];
    for (k, addr) in addrs.iter().enumerate() {
        let (off, n) = spread.segment(k);
        // SAFETY: the caller's: this chunk is referenced by nothing else,
        // and the slice ends before the next chunk's is made.
        let chunk = unsafe { mem.chunk_mut(*addr) };
        let Some(mut dst) = chunk.get_mut(off..off + n) else {
            continue;
        };
        while !dst.is_empty() {
            if pending.is_empty() {
                match bytes.next() {
                    Some(b) => pending = b,
                    None => return,
                }
            }
            let take = pending.len().min(dst.len());
            let (head, rest) = std::mem::take(&mut dst).split_at_mut(take);
            head.copy_from_slice(&pending[..take]);
            pending = &pending[take..];
            dst = rest;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copied_frames_take_whole_chunks_up_to_the_segment_limit() {
        assert_eq!(chunks_for(0, 4096, 18), Err(SendError::Empty));
        assert_eq!(chunks_for(1, 4096, 18), Ok(1));
        assert_eq!(chunks_for(4096, 4096, 18), Ok(1));
        assert_eq!(chunks_for(4097, 4096, 18), Ok(2));
        // The largest frame a pod veth delivers (65535 + 14) fits in 4 KiB chunks.
        assert_eq!(chunks_for(65549, 4096, MAX_SEGMENTS), Ok(17));
        assert_eq!(chunks_for(4097, 4096, 1), Err(SendError::TooLarge));
        assert_eq!(
            chunks_for(18 * 4096 + 1, 4096, MAX_SEGMENTS),
            Err(SendError::TooLarge)
        );
    }
}
