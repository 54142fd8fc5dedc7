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
        let max = if self.cfg.multi_buffer {
            MAX_SEGMENTS
        } else {
            1
        };
        let segs = chunks_for(len, per, max)?;
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
        // Gather cursor: part index and offset in that part.
        let (mut pi, mut po) = (0, 0);
        let mut left = len;
        for k in 0..segs {
            let Some(addr) = free.pop() else {
                // Checked above: the free list holds at least `segs` chunks.
                break;
            };
            let n = left.min(per);
            // SAFETY: the chunk was just taken off the free list: in no ring,
            // in no batch.
            let chunk = unsafe { mem.chunk_mut(addr) };
            let Some((meta, data)) = chunk.split_at_mut_checked(room) else {
                // A chunk of the free list is a whole chunk: not reached.
                free.push(addr);
                break;
            };
            let mut w = 0;
            while w < n {
                let Some(part) = parts.get(pi) else { break };
                let take = (part.len() - po).min(n - w);
                if let (Some(d), Some(s)) = (data.get_mut(w..w + take), part.get(po..po + take)) {
                    d.copy_from_slice(s);
                }
                w += take;
                po += take;
                if po == part.len() {
                    pi += 1;
                    po = 0;
                }
            }
            left -= n;
            let mut options = if k + 1 < segs { libc::XDP_PKT_CONTD } else { 0 };
            if k == 0
                && let Some(c) = csum
            {
                c.write(meta);
                options |= libc::XDP_TX_METADATA;
            }
            sock.pending.push_back(xdp_desc {
                addr: addr + room as u64,
                len: n as u32,
                options,
            });
        }
        sock.tx_out += segs as u64;
        sock.stats.tx_copied += 1;
        Ok(())
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
