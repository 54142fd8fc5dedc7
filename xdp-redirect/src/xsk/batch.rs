//! Batches of received packets: [`Xsk::recv`] fills an [`RxBatch`],
//! [`Xsk::frame`] lends one packet as a [`FrameMut`], [`Xsk::complete`]
//! applies the verdicts.
//!
//! Owns the descriptors of the packets in a batch (a packet is one first
//! chunk plus its continuation chunks, chained with `XDP_PKT_CONTD`).
//! Guarantees: a batch holds whole packets only, every descriptor in it lies
//! inside one UMEM chunk, a packet spans at most [`MAX_SEGMENTS`] chunks;
//! bounds moved by the caller stay inside the chunk. No allocation after
//! [`Xsk::batch`].

use libxdp_sys::xdp_desc;

use super::ring;
use super::umem::Memory;
use super::{MAX_SEGMENTS, SocketId, Xsk, XskError};

/// What happens to a frame after processing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Verdict {
    /// Back to the free list.
    #[default]
    Drop,
    /// Onto this socket's tx ring.
    Forward(SocketId),
}

/// Why setting frame bounds was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BoundsError {
    /// Offset plus length exceed the chunk, or the length is zero.
    #[error("data bounds outside the chunk")]
    OutOfChunk,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Packet {
    pub(super) first: u32,
    pub(super) nsegs: u16,
    pub(super) verdict: Verdict,
}

/// A batch of received packets, reused from call to call (no allocation
/// after [`Xsk::batch`]).
#[derive(Debug)]
pub struct RxBatch {
    pub(super) owner: u64,
    pub(super) socket: SocketId,
    pub(super) descs: Vec<xdp_desc>,
    pub(super) packets: Vec<Packet>,
    pub(super) max_packets: usize,
}

impl RxBatch {
    /// Packets in the batch.
    pub fn len(&self) -> usize {
        self.packets.len()
    }

    /// True if the batch holds no packet.
    pub fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }

    /// The socket the packets came from.
    pub fn socket(&self) -> SocketId {
        self.socket
    }

    /// Sets the verdict of packet `i` (ignored if out of range).
    pub fn set_verdict(&mut self, i: usize, verdict: Verdict) {
        if let Some(p) = self.packets.get_mut(i) {
            p.verdict = verdict;
        }
    }
}

/// One received packet, borrowed from a batch.
#[derive(Debug)]
pub struct FrameMut<'a> {
    chunk: &'a mut [u8],
    first: &'a mut xdp_desc,
    conts: &'a [xdp_desc],
    verdict: &'a mut Verdict,
    mem: &'a Memory,
}

impl FrameMut<'_> {
    /// The whole first chunk: headroom, data and tailroom.
    pub fn chunk(&mut self) -> &mut [u8] {
        self.chunk
    }

    /// Offset of the data in the first chunk.
    pub fn offset(&self) -> usize {
        self.mem.offset_in_chunk(self.first.addr)
    }

    /// Data length in the first chunk.
    pub fn len(&self) -> usize {
        self.first.len as usize
    }

    /// True if the first chunk holds no data (never for received frames).
    pub fn is_empty(&self) -> bool {
        self.first.len == 0
    }

    /// The data of the first chunk.
    pub fn data(&self) -> &[u8] {
        let o = self.offset();
        self.chunk.get(o..o + self.len()).unwrap_or(&[])
    }

    /// The data of the first chunk, mutable.
    pub fn data_mut(&mut self) -> &mut [u8] {
        let o = self.offset();
        let l = self.len();
        self.chunk.get_mut(o..o + l).unwrap_or(&mut [])
    }

    /// Moves the data bounds of the first chunk (push or pull a header).
    pub fn set_bounds(&mut self, offset: usize, len: usize) -> Result<(), BoundsError> {
        if len == 0
            || offset
                .checked_add(len)
                .is_none_or(|end| end > self.chunk.len())
        {
            return Err(BoundsError::OutOfChunk);
        }
        let base = self.mem.chunk_base(self.first.addr);
        self.first.addr = base + offset as u64;
        self.first.len = len as u32;
        Ok(())
    }

    /// Number of continuation chunks.
    pub fn continuations(&self) -> usize {
        self.conts.len()
    }

    /// The data of continuation chunk `k` (empty if out of range).
    pub fn continuation(&self, k: usize) -> &[u8] {
        self.conts.get(k).map_or(&[], |d| self.mem.slice(d))
    }

    /// The first chunk mutably together with the data of the continuation
    /// chunks (distinct chunks, so both borrows hold at once and nothing is
    /// copied): fills `tail` with up to `tail.len()` continuation slices and
    /// returns the chunk and how many were filled. A packet with more
    /// continuations than `tail` holds reports them all in
    /// [`Self::continuations`]; the caller compares.
    pub fn split_tail<'s>(&'s mut self, tail: &mut [&'s [u8]]) -> (&'s mut [u8], usize) {
        let mem: &'s Memory = self.mem;
        let mut n = 0;
        for (slot, d) in tail.iter_mut().zip(self.conts.iter()) {
            *slot = mem.slice(d);
            n += 1;
        }
        (&mut *self.chunk, n)
    }

    /// Offset of continuation chunk `k`'s data within its chunk.
    pub fn continuation_offset(&self, k: usize) -> usize {
        self.conts
            .get(k)
            .map_or(0, |d| self.mem.offset_in_chunk(d.addr))
    }

    /// Bytes of the whole packet over all chunks.
    pub fn total_len(&self) -> usize {
        self.len() + self.conts.iter().map(|d| d.len as usize).sum::<usize>()
    }

    /// Forward to `to` after [`Xsk::complete`].
    pub fn forward(&mut self, to: SocketId) {
        *self.verdict = Verdict::Forward(to);
    }

    /// Drop (back to the free list) after [`Xsk::complete`].
    pub fn drop_frame(&mut self) {
        *self.verdict = Verdict::Drop;
    }
}

impl Xsk {
    /// A batch sized for this UMEM (the only allocation of the cycle).
    pub fn batch(&self) -> RxBatch {
        RxBatch {
            owner: self.id,
            socket: SocketId(0),
            descs: Vec::with_capacity(self.cfg.batch_size + MAX_SEGMENTS),
            packets: Vec::with_capacity(self.cfg.batch_size),
            max_packets: self.cfg.batch_size,
        }
    }

    /// Receives up to `batch_size` whole packets from `id` into `batch`
    /// (completing whatever the batch still held first). Returns the number
    /// of packets.
    pub fn recv(&mut self, id: SocketId, batch: &mut RxBatch) -> Result<usize, XskError> {
        if batch.owner != self.id {
            return Err(XskError::ForeignBatch);
        }
        if !batch.packets.is_empty() {
            self.complete(batch)?;
        }
        batch.descs.clear();
        batch.packets.clear();
        batch.socket = id;
        let mem = &self.mem;
        let free = &mut self.free;
        let sock = self
            .sockets
            .get_mut(id.0 as usize)
            .and_then(Option::as_mut)
            .ok_or(XskError::NoSuchSocket(id))?;
        let cap = batch.descs.capacity() as u32;
        let peek = ring::rx_peek(sock, cap);
        let mut used = 0u32;
        let mut start = 0u32;
        let mut bad_chain = false;
        for k in 0..peek.len() {
            if batch.packets.len() >= batch.max_packets {
                break;
            }
            let Some(d) = peek.desc(sock, k) else { break };
            batch.descs.push(d);
            let seg = k + 1 - start;
            bad_chain |= !mem.contains(&d) || seg as usize > MAX_SEGMENTS;
            if d.options & libc::XDP_PKT_CONTD == 0 {
                let first = batch.descs.len() - seg as usize;
                if bad_chain {
                    // Broken descriptors: hand the valid chunks back.
                    for bd in batch.descs.drain(first..) {
                        if mem.contains(&bd) {
                            free.push(mem.chunk_base(bd.addr));
                        } else {
                            // Outside the UMEM: nothing to reclaim.
                        }
                    }
                    sock.stats.rx_invalid += 1;
                } else {
                    batch.packets.push(Packet {
                        first: first as u32,
                        nsegs: seg as u16,
                        verdict: Verdict::Drop,
                    });
                    sock.stats.rx_packets += 1;
                }
                sock.fill_out = sock.fill_out.saturating_sub(u64::from(seg));
                sock.stats.rx_descs += u64::from(seg);
                used = k + 1;
                start = k + 1;
                bad_chain = false;
            }
        }
        // Descriptors of an incomplete trailing chain stay in the ring.
        let tail = batch.descs.len()
            - batch
                .packets
                .last()
                .map_or(0, |p| p.first as usize + p.nsegs as usize);
        batch.descs.truncate(batch.descs.len() - tail);
        ring::rx_finish(sock, peek, used);
        self.held += batch.descs.len() as u64;
        Ok(batch.packets.len())
    }

    /// Packet `i` of `batch` (`None` if out of range or foreign).
    pub fn frame<'a>(&'a self, batch: &'a mut RxBatch, i: usize) -> Option<FrameMut<'a>> {
        if batch.owner != self.id {
            return None;
        }
        let p = batch.packets.get_mut(i)?;
        let first = p.first as usize;
        let (head, rest) = batch
            .descs
            .get_mut(first..first + p.nsegs as usize)?
            .split_first_mut()?;
        let base = self.mem.chunk_base(head.addr) as usize;
        if !self.mem.contains(head) {
            return None;
        }
        // SAFETY: `contains` checked the chunk lies in the mapping; the
        // chunk belongs to this batch (received, not in any ring, in no
        // other batch), and the `&mut` borrow of the batch makes this the
        // only reference to it.
        let chunk = unsafe {
            std::slice::from_raw_parts_mut(
                self.mem.base.as_ptr().add(base),
                self.mem.frame_size as usize,
            )
        };
        Some(FrameMut {
            chunk,
            first: head,
            conts: rest,
            verdict: &mut p.verdict,
            mem: &self.mem,
        })
    }

    /// Applies the verdicts of `batch`: forwarded packets go to their
    /// socket's tx queue (dropped if it is full), the rest to the free list.
    /// The batch is empty afterwards.
    pub fn complete(&mut self, batch: &mut RxBatch) -> Result<(), XskError> {
        if batch.owner != self.id {
            return Err(XskError::ForeignBatch);
        }
        for p in batch.packets.drain(..) {
            let segs = &mut batch.descs[p.first as usize..p.first as usize + p.nsegs as usize];
            let target = match p.verdict {
                Verdict::Forward(to) => self
                    .sockets
                    .get_mut(to.0 as usize)
                    .and_then(Option::as_mut)
                    .filter(|s| s.pending.len() + segs.len() <= s.pending_cap),
                Verdict::Drop => None,
            };
            match target {
                Some(sock) => {
                    let last = segs.len() - 1;
                    for (k, d) in segs.iter_mut().enumerate() {
                        d.options = if k == last { 0 } else { libc::XDP_PKT_CONTD };
                        sock.pending.push_back(*d);
                    }
                    sock.tx_out += segs.len() as u64;
                }
                None => {
                    if let Verdict::Forward(to) = p.verdict
                        && let Some(Some(s)) = self.sockets.get_mut(to.0 as usize)
                    {
                        s.stats.tx_queue_full += 1;
                    }
                    for d in segs.iter() {
                        self.free.push(self.mem.chunk_base(d.addr));
                    }
                }
            }
        }
        self.held -= batch.descs.len() as u64;
        batch.descs.clear();
        Ok(())
    }
}
