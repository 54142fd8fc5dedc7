//! A frame as a worker sees it: the first UMEM chunk (headroom, then the packet's first bytes)
//! plus, for AF_XDP multi-buffer frames, the further chunks that hold the rest of the payload.
//!
//! Owns: the packet window inside the first buffer (`off`, `len`), headroom handling for encap
//! (`push_front`) and decap (`pull_front`). Guarantees: headers always live in the first buffer
//! (`head()`); the tail buffers are payload only and never rewritten; no method panics on any
//! input. After the pipeline, the AF_XDP layer rewrites its first descriptor from
//! [`Frame::offset`] and [`Frame::len`] and forwards the tail descriptors unchanged, in order.

/// Why a frame window change was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Not enough headroom in front of the packet for the bytes to prepend.
    NoHeadroom,
    /// The packet's first buffer is shorter than the bytes to remove.
    TooShort,
}

/// One packet: a window `[off, off + len)` of the first buffer plus payload-only tail buffers.
#[derive(Debug)]
pub struct Frame<'a> {
    buf: &'a mut [u8],
    off: usize,
    len: usize,
    tail: &'a [&'a [u8]],
    tx_checksum: Option<TxChecksum>,
}

/// A request to the transmitter to complete the packet's L4 checksum (AF_XDP TX metadata; the
/// kernel then hands the packet on as CHECKSUM_PARTIAL): the sum runs from `start` (bytes from the
/// start of the packet) to its end and goes at `start + offset`, which holds the pseudo-header sum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxChecksum {
    pub start: u16,
    pub offset: u16,
}

impl<'a> Frame<'a> {
    /// A single-buffer frame whose packet is `buf[off..off + len]`. A window outside `buf` is
    /// clamped to it (the frame then holds fewer bytes and parsing drops it as truncated).
    pub fn new(buf: &'a mut [u8], off: usize, len: usize) -> Self {
        let off = off.min(buf.len());
        let len = len.min(buf.len() - off);
        Self {
            buf,
            off,
            len,
            tail: &[],
            tx_checksum: None,
        }
    }

    /// The checksum the transmitter must complete (set by the pipeline when it leaves a partial
    /// checksum partial for a receiver that accepts it).
    pub fn tx_checksum(&self) -> Option<TxChecksum> {
        self.tx_checksum
    }

    /// Ask the transmitter to complete the L4 checksum (see [`TxChecksum`]), or withdraw it.
    pub fn set_tx_checksum(&mut self, request: Option<TxChecksum>) {
        self.tx_checksum = request;
    }

    /// Attach further buffers (payload only, in order), as AF_XDP multi-buffer delivers them.
    pub fn with_tail(mut self, tail: &'a [&'a [u8]]) -> Self {
        self.tail = tail;
        self
    }

    /// The packet bytes in the first buffer (all headers are here).
    pub fn head(&self) -> &[u8] {
        &self.buf[self.off..self.off + self.len]
    }

    /// The packet bytes in the first buffer, writable.
    pub fn head_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.off..self.off + self.len]
    }

    /// The further buffers of a multi-buffer frame (empty for a single-buffer frame).
    pub fn tail(&self) -> &'a [&'a [u8]] {
        self.tail
    }

    /// Packet start inside the first buffer (for the AF_XDP descriptor address).
    pub fn offset(&self) -> usize {
        self.off
    }

    /// Packet bytes in the first buffer (for the AF_XDP descriptor length).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the first buffer holds no packet bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes free in front of the packet.
    pub fn headroom(&self) -> usize {
        self.off
    }

    /// The packet's length over all buffers.
    pub fn total_len(&self) -> usize {
        self.len + self.tail.iter().map(|b| b.len()).sum::<usize>()
    }

    /// Whether the packet spans more than one buffer.
    pub fn is_chained(&self) -> bool {
        self.tail.iter().any(|b| !b.is_empty())
    }

    /// Grow the packet at the front by `n` bytes taken from the headroom (for encapsulation).
    /// The new bytes are left as they were in the buffer; the caller writes them.
    pub fn push_front(&mut self, n: usize) -> Result<(), FrameError> {
        if n > self.off {
            return Err(FrameError::NoHeadroom);
        }
        self.off -= n;
        self.len += n;
        Ok(())
    }

    /// Remove `n` bytes from the front of the packet (for decapsulation).
    pub fn pull_front(&mut self, n: usize) -> Result<(), FrameError> {
        if n > self.len {
            return Err(FrameError::TooShort);
        }
        self.off += n;
        self.len -= n;
        Ok(())
    }

    /// Shorten the packet in the first buffer to `len` bytes (drops trailing padding). Only
    /// meaningful for single-buffer frames; a chained frame keeps its tail.
    pub fn truncate_head(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Iterate over the packet bytes from `from` (an offset into the packet) to its end, buffer by
    /// buffer. Used by full checksums; never allocates.
    pub fn chunks_from(&self, from: usize) -> impl Iterator<Item = &[u8]> {
        let head = self.head();
        let first = head.get(from.min(head.len())..).unwrap_or(&[]);
        let mut skip = from.saturating_sub(head.len());
        core::iter::once(first).chain(self.tail.iter().map(move |b| {
            let s = skip.min(b.len());
            skip -= s;
            &b[s..]
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_and_pull_move_the_window() {
        let mut buf = [0u8; 64];
        let mut f = Frame::new(&mut buf, 16, 20);
        assert_eq!(f.push_front(17), Err(FrameError::NoHeadroom));
        f.push_front(16).unwrap();
        assert_eq!((f.offset(), f.len()), (0, 36));
        f.pull_front(30).unwrap();
        assert_eq!((f.offset(), f.len()), (30, 6));
        assert_eq!(f.pull_front(7), Err(FrameError::TooShort));
    }

    #[test]
    fn window_is_clamped_to_the_buffer() {
        let mut buf = [0u8; 10];
        let f = Frame::new(&mut buf, 8, 100);
        assert_eq!((f.offset(), f.len()), (8, 2));
    }

    #[test]
    fn chunks_walk_the_chain() {
        let mut buf = [1u8, 2, 3, 4];
        let t1 = [5u8, 6];
        let t2 = [7u8];
        let tail: [&[u8]; 2] = [&t1, &t2];
        let f = Frame::new(&mut buf, 1, 3).with_tail(&tail);
        assert_eq!(f.total_len(), 6);
        let all: Vec<u8> = f.chunks_from(2).flatten().copied().collect();
        assert_eq!(all, vec![4, 5, 6, 7]);
        let all: Vec<u8> = f.chunks_from(4).flatten().copied().collect();
        assert_eq!(all, vec![6, 7]);
    }
}
