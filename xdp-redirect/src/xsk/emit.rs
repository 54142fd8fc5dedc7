//! New packets made from a received one (software TSO, IPv4 fragments):
//! [`Xsk::emit_from`] lends packet `i` of a batch as its source together with
//! an [`Emitter`] that hands out fresh chunks of the free list
//! ([`TxBuffers`]) and queues each packet written into them on one socket as
//! a chain of tx descriptors (`XDP_PKT_CONTD`).
//!
//! Owns: the fresh chunks between [`Emitter::buffers`] and
//! [`TxBuffers::queue`] (or the buffers' drop, which gives them back).
//! Guarantees: the source packet stays in its batch, descriptors and chunks
//! untouched (only its own `FrameMut` may change its bounds or verdict); the
//! fresh chunks are claimed in the UMEM's [`ChunkClaims`] while lent, so
//! they are distinct from each other, from the source's chunks and from any
//! chunk of any live batch, and the frame accounting counts them as `held`,
//! then as `tx` once queued; chunks not used by a queued packet go back to
//! the free list; a refused request takes nothing. No allocation, no
//! syscall: the next [`Xsk::flush`] transmits.
//!
//! Why a source and an emitter rather than a callback per packet: the
//! pipeline's segmenter borrows a frame built over the source (its first
//! chunk mutably, `sluice_dataplane::frame::Frame::new` takes `&mut [u8]`)
//! and keeps its cursor from packet to packet, so the source must stay lent
//! for the whole emission, next to a way of getting buffers:
//!
//! ```text
//! let (src, mut out) = xsk.emit_from(&mut batch, i, uplink)?;
//! let (chunk, off, len, conts) = src.into_parts();          // tail: ArrayVec of conts
//! let frame = Frame::new(chunk, off, len).with_tail(&tail);
//! let Oversize::Split(mut seg) = segment::plan(&frame, mtu)? else { .. };
//! while let Some(need) = seg.next_len() {
//!     let tails = out.tail_chunks_for(need, VXLAN_ENCAP_LEN);
//!     let mut bufs = out.buffers(tails)?;                   // QueueFull / NoFreeChunks: stop
//!     let start = bufs.data_start() + VXLAN_ENCAP_LEN;
//!     let (head, tail) = bufs.parts();
//!     let w = seg.write_next(head, start, tail)?;
//!     let mut piece = Frame::new(head, start, w.head_len);
//!     tun.encap(&mut piece, ip_id)?;                        // pushes 50 bytes in front
//!     bufs.queue(Emitted { offset: piece.offset(), head_len: piece.len(),
//!                          tail_bufs: w.tail_bufs, last_tail_len: w.last_tail_len })?;
//! }
//! let sent = out.queued();                                  // then drop packet i as usual
//! ```
//!
//! Chunk layout of an emitted packet (offsets from the chunk start): its
//! first chunk is the whole chunk ([`TxBuffers::parts`]), of which a
//! descriptor may start at [`TxBuffers::data_start`] (after the tx metadata
//! room) or later, so a writer leaves room in front for headers it pushes
//! afterwards; every tail chunk is lent from `data_start` to its end and its
//! descriptor covers it from there.

use libxdp_sys::xdp_desc;

use super::batch::{BoundsError, FrameMut};
use super::copy::SendError;
use super::socket::Socket;
use super::umem::{ChunkClaims, Memory};
use super::{MAX_SEGMENTS, RxBatch, SocketId, Xsk};

/// Why [`Xsk::emit_from`] lent nothing (per packet: small and `Copy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EmitError {
    /// The batch has no packet with this index, or belongs to another UMEM.
    #[error("no packet with this index in a batch of this UMEM")]
    NoSuchPacket,
    /// The socket id does not name an open socket.
    #[error("no open AF_XDP socket with this id")]
    NoSuchSocket,
}

/// Where a packet written into [`TxBuffers`] lies, for [`TxBuffers::queue`]
/// (the shape of the segmenter's `Written`, after any push in front).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Emitted {
    /// Offset of the packet's first byte in the first chunk (at least
    /// [`TxBuffers::data_start`]).
    pub offset: usize,
    /// Bytes of the packet in the first chunk, from `offset`.
    pub head_len: usize,
    /// Tail chunks used, in order; all but the last are full (their whole
    /// slice of [`TxBuffers::parts`]).
    pub tail_bufs: usize,
    /// Bytes in the last tail chunk used (ignored when `tail_bufs` is 0).
    pub last_tail_len: usize,
}

/// Packets made from one received packet, queued on one socket (from
/// [`Xsk::emit_from`]); see the module doc.
#[derive(Debug)]
pub struct Emitter<'a> {
    mem: &'a Memory,
    free: &'a mut Vec<u64>,
    claims: &'a mut ChunkClaims,
    sock: &'a mut Socket,
    /// Chunks one packet may span (1 without multi-buffer).
    max_segments: usize,
    queued: usize,
}

impl Emitter<'_> {
    /// Packets queued so far.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Bytes of packet data a chunk holds at most: from
    /// [`TxBuffers::data_start`] to its end (a chunk minus the tx metadata
    /// room).
    pub fn data_per_chunk(&self) -> usize {
        self.mem.frame_size as usize - self.mem.tx_metadata_len
    }

    /// Tail chunks a packet of `len` bytes needs when it starts `headroom`
    /// bytes after [`TxBuffers::data_start`] in its first chunk.
    pub fn tail_chunks_for(&self, len: usize, headroom: usize) -> usize {
        let head = self.data_per_chunk().saturating_sub(headroom);
        len.saturating_sub(head).div_ceil(self.data_per_chunk())
    }

    /// A first chunk and `tail` tail chunks from the free list, for one
    /// packet. Refused, taking nothing, when the packet would span more
    /// chunks than one may ([`SendError::TooLarge`]), when the socket's tx
    /// queue has no room for `1 + tail` descriptors
    /// ([`SendError::QueueFull`], counted in `tx_queue_full`) or when the
    /// free list has fewer chunks ([`SendError::NoFreeChunks`]).
    pub fn buffers(&mut self, tail: usize) -> Result<TxBuffers<'_>, SendError> {
        let want = tail + 1;
        if want > self.max_segments {
            return Err(SendError::TooLarge);
        }
        if self.sock.pending.len() + want > self.sock.pending_cap {
            self.sock.stats.tx_queue_full += 1;
            return Err(SendError::QueueFull);
        }
        let mut addrs = [0u64; MAX_SEGMENTS];
        let mut got = 0;
        while got < want {
            let Some(addr) = self.free.pop() else {
                for a in &addrs[..got] {
                    self.claims.release_chunk(self.mem.chunk_index(*a));
                    self.free.push(*a);
                }
                return Err(SendError::NoFreeChunks);
            };
            // A chunk on the free list that is claimed already is a stray
            // second entry of a chunk that is elsewhere: dropping the entry
            // is what the accounting wants.
            if self.claims.claim_chunk(self.mem.chunk_index(addr)) {
                addrs[got] = addr;
                got += 1;
            }
        }
        let room = self.mem.tx_metadata_len;
        // SAFETY: each chunk of `addrs[..want]` was just taken off the free
        // list (in no ring, so the kernel does not touch it) and claimed in
        // `ChunkClaims`, which refuses a chunk claimed already: so these
        // chunks are pairwise distinct, and distinct from every chunk of
        // every live batch, among them the source packet's (`emit_from`
        // checked that its batch is a live batch of this UMEM, whose chunks
        // stay claimed until `Xsk::complete`). Nothing else references them
        // until the `TxBuffers` releases its claims (queue or drop), and the
        // mapping outlives `'_` (borrowed from the `Xsk`).
        let head = unsafe { self.mem.chunk_mut(addrs[0]) };
        let mut tails: [&mut [u8]; MAX_SEGMENTS - 1] = Default::default();
        for (slot, addr) in tails.iter_mut().zip(&addrs[1..want]) {
            // SAFETY: as for `head` above: a distinct chunk claimed for this
            // `TxBuffers`.
            let chunk = unsafe { self.mem.chunk_mut(*addr) };
            *slot = chunk.get_mut(room..).unwrap_or_default();
        }
        Ok(TxBuffers {
            head,
            tails,
            addrs,
            owned: 0..want,
            room,
            mem: self.mem,
            free: self.free,
            claims: self.claims,
            sock: self.sock,
            queued: &mut self.queued,
        })
    }
}

/// Fresh chunks for one packet (from [`Emitter::buffers`]): the first
/// chunk whole, the tail chunks from [`Self::data_start`]. Dropped without
/// [`Self::queue`], they go back to the free list.
#[derive(Debug)]
pub struct TxBuffers<'e> {
    head: &'e mut [u8],
    tails: [&'e mut [u8]; MAX_SEGMENTS - 1],
    /// Chunk addresses: the first chunk, then the tail chunks.
    addrs: [u64; MAX_SEGMENTS],
    /// The chunks of `addrs` this value still owns (claimed, not queued).
    owned: std::ops::Range<usize>,
    room: usize,
    mem: &'e Memory,
    free: &'e mut Vec<u64>,
    claims: &'e mut ChunkClaims,
    sock: &'e mut Socket,
    queued: &'e mut usize,
}

impl<'e> TxBuffers<'e> {
    /// The first offset in a chunk where a tx descriptor may start (the end
    /// of the tx metadata room; 0 without metadata).
    pub fn data_start(&self) -> usize {
        self.room
    }

    /// The first chunk (whole: offsets are chunk offsets) and the tail
    /// chunks' writable slices (from [`Self::data_start`] to the chunk's
    /// end), as `Segmenter::write_next(head, start, tail)` takes them.
    pub fn parts(&mut self) -> (&mut [u8], &mut [&'e mut [u8]]) {
        let n = self.owned.len().saturating_sub(1);
        (&mut *self.head, &mut self.tails[..n])
    }

    /// Queues the packet `e` describes on the emitter's socket: the first
    /// chunk's `[offset, offset + head_len)`, then `tail_bufs` tail chunks
    /// (all full but the last, which holds `last_tail_len` bytes), chained
    /// with `XDP_PKT_CONTD`. Tail chunks not used go back to the free list.
    /// An `e` outside the buffers is refused ([`BoundsError::OutOfChunk`],
    /// or [`BoundsError::NoMetadataRoom`] for an offset before
    /// [`Self::data_start`]) and every chunk goes back.
    pub fn queue(mut self, e: Emitted) -> Result<(), BoundsError> {
        let chunk = self.head.len();
        let tails = self.owned.len() - 1;
        let tail_len = chunk.saturating_sub(self.room);
        if e.offset < self.room {
            return Err(BoundsError::NoMetadataRoom);
        }
        let head_fits = e.head_len > 0 && e.offset.saturating_add(e.head_len) <= chunk;
        let last_fits = e.tail_bufs == 0 || (1..=tail_len).contains(&e.last_tail_len);
        if !head_fits || !last_fits || e.tail_bufs > tails {
            return Err(BoundsError::OutOfChunk);
        }
        let segs = 1 + e.tail_bufs;
        for (k, addr) in self.addrs[..segs].iter().enumerate() {
            let (offset, len) = match k {
                0 => (e.offset, e.head_len),
                _ if k == e.tail_bufs => (self.room, e.last_tail_len),
                _ => (self.room, tail_len),
            };
            self.sock.pending.push_back(xdp_desc {
                addr: addr + offset as u64,
                len: len as u32,
                options: if k + 1 < segs { libc::XDP_PKT_CONTD } else { 0 },
            });
            self.claims.release_chunk(self.mem.chunk_index(*addr));
        }
        // `buffers` checked the queue's room for every chunk of these buffers.
        self.owned.start = segs;
        self.sock.tx_out += segs as u64;
        self.sock.stats.tx_emitted += 1;
        *self.queued += 1;
        Ok(())
    }
}

impl Drop for TxBuffers<'_> {
    fn drop(&mut self) {
        for addr in &self.addrs[self.owned.clone()] {
            self.claims.release_chunk(self.mem.chunk_index(*addr));
            self.free.push(*addr);
        }
    }
}

impl Xsk {
    /// Lends packet `i` of `batch` as the source of new packets, with an
    /// [`Emitter`] that queues them on `to` (see the module doc). The packet
    /// stays in the batch: its bounds and verdict change only through the
    /// returned frame; drop it afterwards as usual. Refused when `batch` is
    /// not a batch of this UMEM or has no packet `i`
    /// ([`EmitError::NoSuchPacket`]) or `to` is not open
    /// ([`EmitError::NoSuchSocket`]).
    pub fn emit_from<'a>(
        &'a mut self,
        batch: &'a mut RxBatch,
        i: usize,
        to: SocketId,
    ) -> Result<(FrameMut<'a>, Emitter<'a>), EmitError> {
        let max_segments = self.max_segments();
        let Self {
            sockets,
            mem,
            free,
            claims,
            id,
            ..
        } = self;
        let sock = sockets
            .get_mut(to.0 as usize)
            .and_then(Option::as_mut)
            .ok_or(EmitError::NoSuchSocket)?;
        let mem: &'a Memory = mem;
        let source = batch
            .packet_descs(*id, i, mem)
            .ok_or(EmitError::NoSuchPacket)?;
        // SAFETY: `packet_descs` checked that the batch is this UMEM's and
        // every descriptor of the packet lies in the mapping. The packet's
        // first chunk belongs to the batch: received (or adopted), in no
        // ring, claimed in `ChunkClaims` until `Xsk::complete`, which needs
        // `&mut` of the batch that `'a` holds. No other `FrameMut` of it is
        // alive (they borrow the `Xsk`, which `&'a mut self` excludes), and
        // the `Emitter` only lends chunks it claims itself, which refuses
        // every chunk claimed already, this one among them.
        let frame =
            unsafe { FrameMut::lend(mem, source.0, source.1) }.ok_or(EmitError::NoSuchPacket)?;
        let emitter = Emitter {
            mem,
            free,
            claims,
            sock,
            max_segments,
            queued: 0,
        };
        Ok((frame, emitter))
    }
}
