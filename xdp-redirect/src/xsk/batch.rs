//! Batches of received packets: [`Xsk::recv`] fills an [`RxBatch`];
//! [`Xsk::frame`] lends one packet as a [`FrameMut`], [`Xsk::frames`] all of
//! them at once; [`Xsk::complete`] applies the verdicts.
//!
//! Owns the descriptors of the packets in a batch (a packet is one first
//! chunk plus its continuation chunks, chained with `XDP_PKT_CONTD`).
//! Guarantees: a batch holds whole packets only, in the order received, its
//! packets' descriptors tile the batch's descriptor list in order; every
//! descriptor lies inside one UMEM chunk and names a chunk no other
//! descriptor of any live batch names ([`super::umem::ChunkClaims`]); a packet
//! spans at most [`MAX_SEGMENTS`] chunks; bounds moved by the caller stay
//! inside the chunk. No allocation after [`Xsk::batch`].
//!
//! Two ways through a batch, same effect:
//! * one packet at a time: `xsk.frame(&mut batch, i)`, then
//!   [`FrameMut::set_bounds`] and [`FrameMut::forward`] on it;
//! * all at once (a pipeline's `process_batch`): `xsk.frames(&mut batch)`
//!   yields every packet as its own [`FrameMut`], in batch order, all alive
//!   together; [`FrameMut::into_parts`] turns one into its first chunk, data
//!   window and continuation slices for the whole borrow. When the frames
//!   are dropped, [`RxBatch::set_bounds`] and [`RxBatch::set_verdict`] record
//!   each packet's new window and verdict by index.

use libxdp_sys::xdp_desc;

use super::metadata::{ChecksumError, TxChecksum};
use super::ring;
use super::umem::Memory;
use super::{MAX_SEGMENTS, SocketId, TX_METADATA_LEN, Xsk, XskError};

/// What happens to a frame after processing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Verdict {
    /// Back to the free list.
    #[default]
    Drop,
    /// Onto this socket's tx ring.
    Forward(SocketId),
}

/// Why setting frame bounds was refused (the old bounds stay).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BoundsError {
    /// Offset plus length exceed the chunk, or the length is zero.
    #[error("data bounds outside the chunk")]
    OutOfChunk,
    /// The batch has no packet with this index.
    #[error("no packet with this index in the batch")]
    NoSuchPacket,
    /// The data would start within the tx metadata room at the chunk's
    /// start ([`super::TX_METADATA_LEN`] bytes when the UMEM has metadata):
    /// the kernel would refuse the descriptor.
    #[error("data bounds leave no room for the tx metadata in front")]
    NoMetadataRoom,
}

/// The layout a descriptor's bounds must keep: chunk size and the room the
/// tx metadata takes at the chunk's start.
#[derive(Debug, Clone, Copy)]
pub(super) struct ChunkLayout {
    pub(super) chunk_size: u64,
    pub(super) tx_metadata_len: usize,
}

impl ChunkLayout {
    pub(super) fn of(mem: &Memory) -> Self {
        Self {
            chunk_size: mem.frame_size,
            tx_metadata_len: mem.tx_metadata_len,
        }
    }
}

/// Moves the data window of a first descriptor to `[offset, offset + len)`
/// of its chunk, or leaves it as it is.
fn move_bounds(
    d: &mut xdp_desc,
    layout: ChunkLayout,
    offset: usize,
    len: usize,
) -> Result<(), BoundsError> {
    let chunk_size = layout.chunk_size;
    let end = offset.checked_add(len).ok_or(BoundsError::OutOfChunk)?;
    if len == 0 || end as u64 > chunk_size {
        return Err(BoundsError::OutOfChunk);
    }
    if offset < layout.tx_metadata_len {
        return Err(BoundsError::NoMetadataRoom);
    }
    d.addr = (d.addr & !(chunk_size - 1)) + offset as u64;
    d.len = len as u32;
    Ok(())
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Packet {
    pub(super) first: u32,
    pub(super) nsegs: u16,
    pub(super) verdict: Verdict,
    /// Checksum offload asked for (forwarded packets only).
    pub(super) csum: Option<TxChecksum>,
    /// Pieces of other packets chained behind this one
    /// ([`RxBatch::append_piece`]): `RxBatch::pieces[pieces..pieces + npieces]`.
    pub(super) pieces: u32,
    pub(super) npieces: u16,
    /// Some chunk of this packet carries a piece of a leader: the packet is
    /// neither sent nor freed on its own (see [`RxBatch::append_piece`]).
    pub(super) absorbed: bool,
}

impl Packet {
    pub(super) fn new(first: u32, nsegs: u16) -> Self {
        Self {
            first,
            nsegs,
            verdict: Verdict::Drop,
            csum: None,
            pieces: 0,
            npieces: 0,
            absorbed: false,
        }
    }

    /// The range of this packet's own descriptors in [`RxBatch::descs`].
    pub(super) fn own(&self) -> std::ops::Range<usize> {
        self.first as usize..self.first as usize + self.nsegs as usize
    }

    /// The range of this packet's pieces in [`RxBatch::pieces`].
    pub(super) fn piece_range(&self) -> std::ops::Range<usize> {
        self.pieces as usize..self.pieces as usize + self.npieces as usize
    }
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
    /// What [`Self::set_bounds`] must keep.
    pub(super) layout: ChunkLayout,
    /// Whether [`Self::set_tx_checksum`] may ask for offload.
    pub(super) tx_checksum: bool,
    /// Descriptors chained behind leaders ([`Self::append_piece`]), each
    /// leader's consecutive; each lies in a chunk of `descs`, no two in one.
    pub(super) pieces: Vec<xdp_desc>,
    /// For each descriptor of `descs`, the packet whose pieces its chunk
    /// carries ([`super::chain::NO_LEADER`] if none); as long as `descs`
    /// from the first piece on, empty before.
    pub(super) piece_of: Vec<u32>,
    /// Chunks one packet may span ([`MAX_SEGMENTS`], 1 without
    /// multi-buffer).
    pub(super) max_segments: usize,
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

    /// Moves packet `i`'s data window in its first chunk to `[offset,
    /// offset + len)` (after a push or pull), as [`FrameMut::set_bounds`]
    /// does; on error the old window stays.
    pub fn set_bounds(&mut self, i: usize, offset: usize, len: usize) -> Result<(), BoundsError> {
        let p = self.packets.get(i).ok_or(BoundsError::NoSuchPacket)?;
        let d = self
            .descs
            .get_mut(p.first as usize)
            .ok_or(BoundsError::NoSuchPacket)?;
        move_bounds(d, self.layout, offset, len)
    }

    /// Asks the kernel to complete packet `i`'s L4 checksum when it is
    /// forwarded: it sums from `csum_start` (counted from the start of the
    /// packet data) to the end of the packet and stores the result at
    /// `csum_start + csum_offset` (6 for UDP, 16 for TCP), which must hold
    /// the pseudo-header sum (as a CHECKSUM_PARTIAL frame from a pod does).
    /// Set the packet's final bounds first: the field must lie in the first
    /// chunk's data (checked now, and again when the packet is queued).
    /// Requires [`Xsk::tx_checksum_offload`]; the request is dropped with
    /// the packet if it is not forwarded.
    pub fn set_tx_checksum(
        &mut self,
        i: usize,
        csum_start: u16,
        csum_offset: u16,
    ) -> Result<(), ChecksumError> {
        if !self.tx_checksum {
            return Err(ChecksumError::Unsupported);
        }
        let p = self.packets.get_mut(i).ok_or(ChecksumError::NoSuchPacket)?;
        let d = self
            .descs
            .get(p.first as usize)
            .ok_or(ChecksumError::NoSuchPacket)?;
        p.csum = Some(TxChecksum::new(csum_start, csum_offset, d.len as usize)?);
        Ok(())
    }

    /// Packet `i`'s descriptors (first chunk, then continuations) and its
    /// record, if the batch belongs to the UMEM `owner` of memory `mem` and
    /// every descriptor lies in `mem` (what [`FrameMut::lend`] needs).
    pub(super) fn packet_descs(
        &mut self,
        owner: u64,
        i: usize,
        mem: &Memory,
    ) -> Option<(&mut [xdp_desc], &mut Packet)> {
        if self.owner != owner {
            return None;
        }
        let p = self.packets.get_mut(i)?;
        let first = p.first as usize;
        let segs = self.descs.get_mut(first..first + p.nsegs as usize)?;
        segs.iter().all(|d| mem.contains(d)).then_some((segs, p))
    }

    /// Empties the batch (no allocation: capacities stay).
    fn clear(&mut self) {
        self.descs.clear();
        self.packets.clear();
        self.pieces.clear();
        self.piece_of.clear();
    }

    /// True if the packets tile the descriptor list in order (the shape
    /// [`Xsk::recv`] builds), each with at least one descriptor.
    fn is_tiled(&self) -> bool {
        let mut next = 0usize;
        let tiled = self.packets.iter().all(|p| {
            let here = p.first as usize == next && p.nsegs > 0;
            next += p.nsegs as usize;
            here
        });
        tiled && next == self.descs.len()
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

impl<'a> FrameMut<'a> {
    /// Lends the packet whose descriptors are `segs` (first chunk, then the
    /// continuations): its whole first chunk mutably, the continuations
    /// read-only. `None` if `segs` is empty.
    ///
    /// # Safety
    /// Every descriptor of `segs` lies inside `mem` ([`Memory::contains`]),
    /// and for `'a` nothing else references the first descriptor's chunk:
    /// no other `FrameMut`, no ring (the chunk was received and not yet
    /// completed), no descriptor of another packet of any live batch.
    pub(super) unsafe fn lend(
        mem: &'a Memory,
        segs: &'a mut [xdp_desc],
        packet: &'a mut Packet,
    ) -> Option<Self> {
        let verdict = &mut packet.verdict;
        let (first, conts) = segs.split_first_mut()?;
        let base = mem.chunk_base(first.addr) as usize;
        // SAFETY: `first` lies in the mapping (caller), which is a whole
        // number of chunks, so its whole chunk does too; nothing else
        // references that chunk for `'a` (caller), and the mapping lives as
        // long as the `&'a Memory`.
        let chunk = unsafe {
            std::slice::from_raw_parts_mut(mem.base.as_ptr().add(base), mem.frame_size as usize)
        };
        Some(Self {
            chunk,
            first,
            conts,
            verdict,
            mem,
        })
    }

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

    /// Moves the data bounds of the first chunk (push or pull a header); on
    /// error the old bounds stay.
    pub fn set_bounds(&mut self, offset: usize, len: usize) -> Result<(), BoundsError> {
        move_bounds(self.first, ChunkLayout::of(self.mem), offset, len)
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

    /// The frame as its parts, for the whole borrow of the batch: the first
    /// chunk (mutable), the data offset and length in it, and the data of the
    /// continuation chunks in order. Bounds and verdict are then set on the
    /// batch by index ([`RxBatch::set_bounds`], [`RxBatch::set_verdict`])
    /// once the frames are gone.
    pub fn into_parts(self) -> (&'a mut [u8], usize, usize, Continuations<'a>) {
        let (offset, len) = (self.offset(), self.len());
        let conts = Continuations {
            descs: self.conts.iter(),
            mem: self.mem,
        };
        (self.chunk, offset, len, conts)
    }
}

/// The data of a packet's continuation chunks, in order (from
/// [`FrameMut::into_parts`]).
#[derive(Debug, Clone)]
pub struct Continuations<'a> {
    descs: std::slice::Iter<'a, xdp_desc>,
    mem: &'a Memory,
}

impl<'a> Iterator for Continuations<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let mem = self.mem;
        self.descs.next().map(|d| mem.slice(d))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.descs.size_hint()
    }
}

impl ExactSizeIterator for Continuations<'_> {}

impl DoubleEndedIterator for Continuations<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        let mem = self.mem;
        self.descs.next_back().map(|d| mem.slice(d))
    }
}

/// Every packet of a batch as its own [`FrameMut`], in batch order, all
/// alive at once (from [`Xsk::frames`]).
#[derive(Debug)]
pub struct Frames<'a> {
    packets: std::slice::IterMut<'a, Packet>,
    /// The descriptors of the packets not yet yielded, first to last.
    descs: &'a mut [xdp_desc],
    mem: &'a Memory,
}

impl<'a> Iterator for Frames<'a> {
    type Item = FrameMut<'a>;

    fn next(&mut self) -> Option<FrameMut<'a>> {
        let p = self.packets.next()?;
        // The packets tile the descriptors in order (checked in `Xsk::frames`),
        // so this packet's descriptors are the next `nsegs`.
        let (segs, rest) = std::mem::take(&mut self.descs).split_at_mut_checked(p.nsegs.into())?;
        self.descs = rest;
        // SAFETY: `Xsk::frames` checked every descriptor of the batch with
        // `Memory::contains` (bounds only ever move inside a chunk). `Xsk::recv`
        // claimed the chunk of each descriptor of every live batch in
        // `ChunkClaims`, refusing one claimed already, and claims end only in
        // `Xsk::complete`, which takes the batch by `&mut`: so the chunks of
        // all descriptors of all live batches are pairwise distinct, and this
        // packet's first chunk is lent once (each packet is yielded once, and
        // `Frames` holds the batch's `&'a mut` borrow, so neither `Xsk::frame`
        // nor another `Frames` reaches this batch meanwhile).
        unsafe { FrameMut::lend(self.mem, segs, p) }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.packets.size_hint()
    }
}

impl ExactSizeIterator for Frames<'_> {}

impl Xsk {
    /// A batch sized for this UMEM (the only allocation of the cycle).
    pub fn batch(&self) -> RxBatch {
        let descs = self.cfg.batch_size + MAX_SEGMENTS;
        RxBatch {
            owner: self.id,
            socket: SocketId(0),
            descs: Vec::with_capacity(descs),
            packets: Vec::with_capacity(self.cfg.batch_size),
            max_packets: self.cfg.batch_size,
            layout: ChunkLayout::of(&self.mem),
            tx_checksum: self.tx_checksum_offload(),
            pieces: Vec::with_capacity(descs),
            piece_of: Vec::with_capacity(descs),
            max_segments: self.max_segments(),
        }
    }

    /// Chunks one packet may span: [`MAX_SEGMENTS`] with multi-buffer, else 1.
    pub(super) fn max_segments(&self) -> usize {
        if self.cfg.multi_buffer {
            MAX_SEGMENTS
        } else {
            1
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
        batch.clear();
        batch.socket = id;
        let mem = &self.mem;
        let free = &mut self.free;
        let claims = &mut self.claims;
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
                } else if !claims.claim(mem, &batch.descs[first..]) {
                    // A chunk some batch holds already (the rings would be corrupt): none of
                    // the chain's chunks is trusted or reclaimed; the accounting shows it.
                    batch.descs.truncate(first);
                    sock.stats.rx_invalid += 1;
                } else {
                    batch.packets.push(Packet::new(first as u32, seg as u16));
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
        Ok(batch.packets.len())
    }

    /// Packet `i` of `batch` (`None` if out of range or foreign).
    pub fn frame<'a>(&'a self, batch: &'a mut RxBatch, i: usize) -> Option<FrameMut<'a>> {
        let (segs, p) = batch.packet_descs(self.id, i, &self.mem)?;
        // SAFETY: `packet_descs` checked that the batch is this UMEM's and
        // every descriptor lies in the mapping. The first chunk belongs to
        // this batch: received, in no ring, claimed in `ChunkClaims` (so
        // named by no other descriptor of any live batch); the `&'a mut`
        // borrow of the batch makes this the only frame lent from it during
        // `'a`.
        unsafe { FrameMut::lend(&self.mem, segs, p) }
    }

    /// Every packet of `batch` as its own [`FrameMut`], in batch order, all
    /// alive at once: their first chunks are distinct chunks, lent mutably
    /// together (what a pipeline's `process_batch` needs). Packet `k` of the
    /// iteration is packet `k` of the batch, for [`RxBatch::set_bounds`] and
    /// [`RxBatch::set_verdict`] afterwards. Nothing is allocated. Yields
    /// nothing for a batch of another [`Xsk`].
    ///
    /// Because all frames are alive together, [`FrameMut::into_parts`] of
    /// each gives a view of the whole batch in which any packet's first
    /// chunk is writable while the others' chunks are readable: what the
    /// coalescer needs (the leader's headers rewritten in place, the
    /// followers' payload located), before [`RxBatch::append_piece`] by
    /// index once the frames are gone.
    pub fn frames<'a>(&'a self, batch: &'a mut RxBatch) -> Frames<'a> {
        let whole = batch.owner == self.id
            && batch.is_tiled()
            && batch.descs.iter().all(|d| self.mem.contains(d));
        let (packets, descs): (&mut [Packet], &mut [xdp_desc]) = if whole {
            (&mut batch.packets, &mut batch.descs)
        } else {
            (&mut [], &mut [])
        };
        Frames {
            packets: packets.iter_mut(),
            descs,
            mem: &self.mem,
        }
    }

    /// Applies the verdicts of `batch`: forwarded packets go to their
    /// socket's tx queue (dropped if it is full, or if their checksum request
    /// no longer fits their data), each as its own descriptors then the
    /// pieces appended behind it ([`RxBatch::append_piece`]), with their
    /// checksum request written in front of the data; the rest go to the
    /// free list. A packet whose chunks carry pieces is not sent on its own:
    /// each chunk of it leaves with the leader whose piece it carries, or
    /// goes to the free list (no piece, or its leader was not sent). The
    /// batch is empty afterwards.
    pub fn complete(&mut self, batch: &mut RxBatch) -> Result<(), XskError> {
        if batch.owner != self.id {
            return Err(XskError::ForeignBatch);
        }
        for i in 0..batch.packets.len() {
            let p = batch.packets[i];
            if p.absorbed {
                continue;
            }
            let own = &batch.descs[p.own()];
            if !self.queue_packet(&p, own, &batch.pieces[p.piece_range()]) {
                for d in own {
                    self.free.push(self.mem.chunk_base(d.addr));
                }
                // Not sent: the chunks of its pieces are freed below.
                batch.packets[i].verdict = Verdict::Drop;
            }
        }
        if !batch.pieces.is_empty() {
            for p in batch.packets.iter().filter(|p| p.absorbed) {
                for k in p.own() {
                    let leader = batch
                        .piece_of
                        .get(k)
                        .and_then(|&l| batch.packets.get(l as usize));
                    if !leader.is_some_and(|l| matches!(l.verdict, Verdict::Forward(_))) {
                        self.free.push(self.mem.chunk_base(batch.descs[k].addr));
                    }
                }
            }
        }
        self.claims.release(&self.mem, &batch.descs);
        batch.clear();
        Ok(())
    }

    /// Queues packet `p` (its descriptors `own`, then `pieces`) on the
    /// socket of its verdict; false (nothing queued, counted) if it is
    /// dropped, its socket's queue is full or its checksum request no longer
    /// fits.
    fn queue_packet(&mut self, p: &Packet, own: &[xdp_desc], pieces: &[xdp_desc]) -> bool {
        let Verdict::Forward(to) = p.verdict else {
            return false;
        };
        let Some(sock) = self.sockets.get_mut(to.0 as usize).and_then(Option::as_mut) else {
            return false;
        };
        let Some(first) = own.first() else {
            return false;
        };
        let segs = own.len() + pieces.len();
        if p.csum.is_some_and(|c| !c.fits(first.len as usize)) {
            sock.stats.tx_csum_invalid += 1;
            return false;
        }
        if sock.pending.len() + segs > sock.pending_cap {
            sock.stats.tx_queue_full += 1;
            return false;
        }
        let mut first_options = 0;
        if let Some(c) = p.csum {
            let off = self.mem.offset_in_chunk(first.addr);
            // SAFETY: the chunk is held by the batch being completed:
            // received, in no ring until queued below; no `FrameMut` of it is
            // alive (they borrow the `Xsk`, which `&mut self` excludes).
            let chunk = unsafe { self.mem.chunk_mut(first.addr) };
            if let Some(meta) = off
                .checked_sub(TX_METADATA_LEN as usize)
                .and_then(|start| chunk.get_mut(start..off))
            {
                c.write(meta);
                first_options = libc::XDP_TX_METADATA;
            }
        }
        for (k, d) in own.iter().chain(pieces).enumerate() {
            let contd = if k + 1 == segs {
                0
            } else {
                libc::XDP_PKT_CONTD
            };
            sock.pending.push_back(xdp_desc {
                options: contd | if k == 0 { first_options } else { 0 },
                ..*d
            });
        }
        sock.tx_out += segs as u64;
        true
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// 4 KiB chunks with tx metadata.
    const LAYOUT: ChunkLayout = ChunkLayout {
        chunk_size: 4096,
        tx_metadata_len: TX_METADATA_LEN as usize,
    };

    pub(in super::super) fn desc(addr: u64, len: u32) -> xdp_desc {
        xdp_desc {
            addr,
            len,
            options: 0,
        }
    }

    /// A batch of chained packets `(first, nsegs)` over `descs`, as recv builds one.
    pub(in super::super) fn batch(descs: Vec<xdp_desc>, packets: &[(u32, u16)]) -> RxBatch {
        RxBatch {
            owner: 0,
            socket: SocketId(0),
            pieces: Vec::with_capacity(descs.len()),
            piece_of: Vec::with_capacity(descs.len()),
            descs,
            packets: packets
                .iter()
                .map(|&(first, nsegs)| Packet::new(first, nsegs))
                .collect(),
            max_packets: 64,
            layout: LAYOUT,
            tx_checksum: true,
            max_segments: MAX_SEGMENTS,
        }
    }

    /// A batch of a one-chunk packet of `first_len` bytes and a three-chunk one.
    fn two_packets(first_len: u32) -> RxBatch {
        let descs = vec![
            desc(320, first_len),
            desc(4096 + 320, 3776),
            desc(8192 + 320, 1000),
        ];
        batch(descs, &[(0, 1), (1, 2)])
    }

    #[test]
    fn bounds_move_inside_the_chunk_only() {
        let mut d = desc(4096 + 320, 100);
        // A 50-byte push in front, as VXLAN encapsulation does.
        assert_eq!(move_bounds(&mut d, LAYOUT, 270, 150), Ok(()));
        assert_eq!((d.addr, d.len), (4096 + 270, 150));
        for (offset, len) in [(270, 0), (4000, 97), (4096, 1), (usize::MAX, 2)] {
            assert_eq!(
                move_bounds(&mut d, LAYOUT, offset, len),
                Err(BoundsError::OutOfChunk),
                "({offset}, {len})"
            );
            assert_eq!(
                (d.addr, d.len),
                (4096 + 270, 150),
                "refused bounds keep the old"
            );
        }
        // The tx metadata room at the chunk's start stays free.
        assert_eq!(
            move_bounds(&mut d, LAYOUT, 23, 100),
            Err(BoundsError::NoMetadataRoom)
        );
        assert_eq!(move_bounds(&mut d, LAYOUT, 24, 4072), Ok(()));
        assert_eq!((d.addr, d.len), (4096 + 24, 4072));
        let no_metadata = ChunkLayout {
            tx_metadata_len: 0,
            ..LAYOUT
        };
        assert_eq!(move_bounds(&mut d, no_metadata, 0, 4096), Ok(()));
        assert_eq!((d.addr, d.len), (4096, 4096));
    }

    #[test]
    fn checksum_requests_are_checked_against_the_first_chunk() {
        let mut b = two_packets(42);
        assert_eq!(b.set_tx_checksum(0, 34, 6), Ok(()));
        assert_eq!(b.set_tx_checksum(0, 34, 7), Err(ChecksumError::OutOfData));
        assert_eq!(b.packets[0].csum, TxChecksum::new(34, 6, 42).ok());
        // A TCP field in a multi-buffer packet's first chunk.
        assert_eq!(b.set_tx_checksum(1, 34, 16), Ok(()));
        assert_eq!(
            b.set_tx_checksum(2, 34, 6),
            Err(ChecksumError::NoSuchPacket)
        );
        b.tx_checksum = false;
        assert_eq!(b.set_tx_checksum(0, 34, 6), Err(ChecksumError::Unsupported));
    }

    #[test]
    fn batch_bounds_are_set_by_packet_index_on_its_first_chunk() {
        let mut b = two_packets(60);
        assert_eq!(b.set_bounds(1, 270, 3826), Ok(()));
        assert_eq!((b.descs[1].addr, b.descs[1].len), (4096 + 270, 3826));
        assert_eq!(
            (b.descs[2].addr, b.descs[2].len),
            (8192 + 320, 1000),
            "tail untouched"
        );
        assert_eq!((b.descs[0].addr, b.descs[0].len), (320, 60));
        assert_eq!(b.set_bounds(2, 0, 1), Err(BoundsError::NoSuchPacket));
        assert_eq!(b.set_bounds(0, 4000, 100), Err(BoundsError::OutOfChunk));
        b.set_verdict(1, Verdict::Forward(SocketId(3)));
        b.set_verdict(9, Verdict::Forward(SocketId(3)));
        assert_eq!(b.packets[1].verdict, Verdict::Forward(SocketId(3)));
        assert_eq!(b.packets[0].verdict, Verdict::Drop);
    }

    #[test]
    fn packets_must_tile_the_descriptors_in_order() {
        let three = || vec![desc(320, 60), desc(4096 + 320, 60), desc(8192 + 320, 60)];
        assert!(batch(three(), &[(0, 1), (1, 2)]).is_tiled());
        assert!(batch(Vec::new(), &[]).is_tiled());
        assert!(!batch(three(), &[(0, 1), (2, 1)]).is_tiled(), "a gap");
        assert!(!batch(three(), &[(0, 2), (1, 2)]).is_tiled(), "an overlap");
        assert!(
            !batch(three(), &[(0, 1), (1, 1)]).is_tiled(),
            "descriptors left over"
        );
        assert!(
            !batch(three(), &[(0, 0), (0, 3)]).is_tiled(),
            "an empty packet"
        );
    }
}
