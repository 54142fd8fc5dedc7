//! Frames that do not live in this UMEM leave through one of its sockets as
//! copies: [`Xsk::send_copy`] writes the bytes into free chunks and queues
//! them like a forwarded packet.
//!
//! Guarantees: all or nothing (on error no chunk is taken and nothing is
//! queued); no allocation, no syscall.

use libxdp_sys::xdp_desc;

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
    /// written into chunks taken from the free list (each filled from offset 0, chained with
    /// `XDP_PKT_CONTD` when the frame spans several) and queued like a forwarded packet; the next
    /// [`Xsk::flush`] puts them on the tx ring and the completions bring the chunks back. On
    /// error nothing is taken and nothing is queued (a full queue counts in `tx_queue_full`).
    ///
    /// This is how a frame that lives outside this UMEM (handed over by another worker) leaves
    /// through one of this UMEM's sockets. No allocation, no syscall.
    pub fn send_copy(&mut self, to: SocketId, parts: &[&[u8]]) -> Result<(), SendError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let per = self.cfg.frame_size as usize;
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
            let chunk = mem.chunk_mut(addr);
            let mut w = 0;
            while w < n {
                let Some(part) = parts.get(pi) else { break };
                let take = (part.len() - po).min(n - w);
                if let (Some(d), Some(s)) = (chunk.get_mut(w..w + take), part.get(po..po + take)) {
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
            sock.pending.push_back(xdp_desc {
                addr,
                len: n as u32,
                options: if k + 1 < segs { libc::XDP_PKT_CONTD } else { 0 },
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
