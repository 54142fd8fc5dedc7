//! One copy across workers: a worker lends chunks of its own UMEM to a
//! peer ([`Xsk::lend`]); the peer, on its own thread, writes a frame into
//! one or more of them ([`LentFrame::write`]) and hands the frame back; the
//! lender adds it to a batch as if received ([`Xsk::adopt`]), after which it
//! goes through `frames`/`set_bounds`/verdicts/`complete` like any received
//! packet, or gives unused chunks back ([`Xsk::reclaim`]).
//!
//! Owns: the lent chunks, each named by exactly one [`LentChunk`] or
//! [`LentFrame`] (neither is `Clone`), and the lender's record of them (the
//! `lent` set of its `ChunkClaims`). Guarantees:
//! * a lent chunk is in no ring, batch, buffer or free list of its lender,
//!   which does not touch it until [`Xsk::adopt`] or [`Xsk::reclaim`] takes
//!   the value that names it back (by value); so the thread holding the
//!   value is the only one that reaches its bytes;
//! * the lender's memory stays mapped while any lent chunk exists (each
//!   value holds an `Arc` of it), even after the lender's [`Xsk`] is gone;
//! * a frame is taken back only by the [`Xsk`] that lent its chunks
//!   ([`LentRefusal::Foreign`] otherwise, the frame handed back in the
//!   error);
//! * accounting: a lent chunk counts as `lent` until taken back; one whose
//!   value was dropped instead (its peer thread died) stays `lent` for good
//!   and counts in `lent_dropped`: it is never reused, and
//!   [`Xsk::audit_quiescent`] reports it.
//!
//! [`LentChunk`] and [`LentFrame`] are `Send`: they move between threads
//! through whatever ring the agent owns (rtrb: one ring of chunks from the
//! lender to each peer, one of frames back). The ring's release/acquire
//! orders the peer's writes before the lender's reads; no other
//! synchronization is involved. No allocation and no syscall on these paths
//! (an `Arc` count changes per chunk lent and given back).
//!
//! Memory: one copy per handed-over frame (into the lent chunks), and a
//! worker's UMEM grows by the stock it lends each peer, so with `w` workers
//! a UMEM needs its own chunks plus `(w - 1) * stock`: linear in workers.
//!
//! A frame's layout in its chunks: the data starts `headroom` bytes after
//! the tx metadata room of the first chunk (so a VXLAN header can be pushed
//! in front later, [`super::VXLAN_ENCAP_LEN`]) and continues from the end of
//! the metadata room of each further chunk, every chunk but the last filled
//! to its end, as [`Xsk::send_copy`] writes a copy.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::batch::{Packet, RxBatch};
use super::copy::{Spread, scatter};
use super::umem::Memory;
use super::{MAX_SEGMENTS, Xsk};

/// One chunk of another worker's UMEM, lent to be written
/// ([`Xsk::lend`]). Give it back to its lender: in a [`LentFrame`] to
/// [`Xsk::adopt`], or to [`Xsk::reclaim`]; dropped anywhere else, the chunk
/// is lost for good (counted in the lender's `lent_dropped`).
#[derive(Debug)]
pub struct LentChunk {
    /// The lender's memory; `None` once the chunk moved on (into a frame).
    mem: Option<Arc<Memory>>,
    /// Chunk base address.
    addr: u64,
}

impl Drop for LentChunk {
    fn drop(&mut self) {
        if let Some(mem) = self.mem.take() {
            mem.lent_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A frame written into up to [`MAX_SEGMENTS`] chunks lent by one
/// [`Xsk`], to be adopted by it ([`Xsk::adopt`]) or given back
/// ([`Xsk::reclaim`]). Dropped instead, its chunks are lost for good
/// (counted in the lender's `lent_dropped`).
#[derive(Debug, Default)]
pub struct LentFrame {
    /// The lender's memory; `None` while the frame has no chunk, and once
    /// its chunks went back.
    mem: Option<Arc<Memory>>,
    /// Chunk indexes in the lender's UMEM, `chunks` of them (indexes, not
    /// addresses: the frame stays small to move through a ring).
    index: [u32; MAX_SEGMENTS],
    chunks: u8,
    /// Where the written data starts in the first chunk.
    first: u32,
    /// Bytes written (0: nothing).
    len: u32,
}

impl Drop for LentFrame {
    fn drop(&mut self) {
        if let Some(mem) = self.mem.take() {
            mem.lent_dropped
                .fetch_add(u64::from(self.chunks), Ordering::Relaxed);
        }
    }
}

impl From<LentChunk> for LentFrame {
    /// A frame of one chunk, nothing written (for [`Xsk::reclaim`]).
    fn from(chunk: LentChunk) -> Self {
        let mut frame = Self::new();
        if let Err(chunk) = frame.push(chunk) {
            // An empty frame takes any chunk: not reached.
            drop(chunk);
        }
        frame
    }
}

/// Why [`LentFrame::write`] wrote nothing (per packet: small and `Copy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// There are no bytes to write.
    #[error("the frame is empty")]
    Empty,
    /// The headroom leaves no byte of the first chunk for data.
    #[error("the headroom fills the first chunk")]
    Headroom,
    /// The frame holds fewer chunks than the bytes need: push more (up to
    /// `need` in all; 1 when the frame has none yet, whose size is not known
    /// then).
    #[error("the frame needs {need} chunks")]
    NeedChunks {
        /// Chunks the frame needs in all.
        need: usize,
    },
    /// The bytes need more chunks than one packet may span.
    #[error("the frame spans more chunks than one packet may")]
    TooLarge,
}

impl LentFrame {
    /// A frame with no chunk (push some, then write).
    pub fn new() -> Self {
        Self::default()
    }

    /// Chunks the frame holds.
    pub fn chunks(&self) -> usize {
        usize::from(self.chunks)
    }

    /// Bytes written (0 before [`Self::write`]).
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// True if nothing is written.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds a chunk behind the others; handed back when the frame has
    /// [`MAX_SEGMENTS`] already or the chunk comes from another lender.
    /// What was written stays (the chunk is then unused).
    pub fn push(&mut self, mut chunk: LentChunk) -> Result<(), LentChunk> {
        let same = match (&self.mem, &chunk.mem) {
            (None, _) => true,
            (Some(mine), Some(its)) => Arc::ptr_eq(mine, its),
            (Some(_), None) => false,
        };
        let Some(mem) = chunk.mem.as_deref() else {
            return Err(chunk);
        };
        let index = u32::try_from(mem.chunk_index(chunk.addr))
            .ok()
            .filter(|_| same && self.chunks() < MAX_SEGMENTS);
        let Some(index) = index else {
            return Err(chunk);
        };
        let mem = chunk.mem.take();
        if self.mem.is_none() {
            self.mem = mem;
        }
        self.index[self.chunks()] = index;
        self.chunks += 1;
        Ok(())
    }

    /// Takes the last chunk out (to keep it for another frame); what was
    /// written is forgotten if it used that chunk.
    pub fn pop(&mut self) -> Option<LentChunk> {
        let mem = self.mem.clone()?;
        self.chunks = self.chunks.checked_sub(1)?;
        if self.data().is_some_and(|d| d.chunks() > self.chunks()) {
            self.len = 0;
        }
        if self.chunks == 0 {
            self.mem = None;
        }
        let addr = u64::from(self.index[self.chunks()]) * mem.frame_size;
        Some(LentChunk {
            mem: Some(mem),
            addr,
        })
    }

    /// Where `len` bytes written from offset `first` of the first chunk
    /// would lie, if the frame has a chunk (and so knows the lender's chunk
    /// size).
    fn spread(&self, len: usize, first: usize) -> Option<Spread> {
        let mem = self.mem.as_ref()?;
        Some(Spread {
            len,
            first,
            room: mem.tx_metadata_len,
            chunk: mem.frame_size as usize,
        })
    }

    /// Where the written bytes lie (`None` if nothing is written).
    fn data(&self) -> Option<Spread> {
        self.spread(self.len(), self.first as usize)
            .filter(|_| self.len > 0)
    }

    /// The base addresses of the frame's chunks (the first `chunks()`).
    fn addrs(&self) -> [u64; MAX_SEGMENTS] {
        let size = self.mem.as_ref().map_or(0, |m| m.frame_size);
        self.index.map(|i| u64::from(i) * size)
    }

    /// Writes the bytes of `parts`, in order, as one frame: from `headroom`
    /// bytes after the tx metadata room of the first chunk (room for a
    /// header pushed in front later), continuing in the further chunks (see
    /// the module doc). Replaces what was written before. Refused, writing
    /// nothing, as [`WriteError`] says.
    pub fn write(&mut self, headroom: usize, parts: &[&[u8]]) -> Result<(), WriteError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len == 0 {
            return Err(WriteError::Empty);
        }
        let room = self.mem.as_ref().map_or(0, |m| m.tx_metadata_len);
        let Some(spread) = self.spread(len, room.saturating_add(headroom)) else {
            return Err(WriteError::NeedChunks { need: 1 });
        };
        if spread.first >= spread.chunk {
            return Err(WriteError::Headroom);
        }
        let need = spread.chunks();
        if need > MAX_SEGMENTS || u32::try_from(len).is_err() {
            return Err(WriteError::TooLarge);
        }
        if need > self.chunks() {
            return Err(WriteError::NeedChunks { need });
        }
        let Some(mem) = self.mem.as_deref() else {
            return Err(WriteError::NeedChunks { need: 1 });
        };
        // SAFETY: the frame's chunks are lent: taken off their lender's free
        // list and marked lent in its `ChunkClaims`, which keeps them out of
        // every ring, batch, buffer and free list of the lender, and the
        // lender touches them again only when `adopt` or `reclaim` takes
        // this frame back by value. Exactly one value names each lent chunk
        // (`LentChunk` and `LentFrame` are not `Clone`; `push` moves the
        // chunk in), and `&mut self` excludes any other access through this
        // one: so nothing else references these chunks during the call, on
        // any thread. The `Arc` keeps the mapping alive.
        unsafe { scatter(mem, &self.addrs()[..need], spread, parts) };
        // Both fit: `spread.first` is inside a chunk, `len` was checked.
        (self.first, self.len) = (spread.first as u32, len as u32);
        Ok(())
    }

    /// True if the frame's chunks are lent by the UMEM of `mem`.
    fn is_from(&self, mem: &Arc<Memory>) -> bool {
        self.mem.as_ref().is_some_and(|m| Arc::ptr_eq(m, mem))
    }
}

/// Why a lent frame was not taken back (per packet: small and `Copy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LentRefusal {
    /// The frame's chunks were lent by another [`Xsk`] (or it has none).
    #[error("the frame was lent by another UMEM")]
    Foreign,
    /// The batch belongs to another [`Xsk`].
    #[error("the batch belongs to another UMEM")]
    ForeignBatch,
    /// Nothing was written into the frame ([`Xsk::reclaim`] it instead).
    #[error("nothing was written into the frame")]
    NotWritten,
    /// The batch has no room for another packet or its descriptors.
    #[error("the batch is full")]
    BatchFull,
    /// The frame spans more chunks than a packet of this UMEM may (1
    /// without multi-buffer).
    #[error("the frame spans more chunks than a packet may")]
    TooManySegments,
    /// A chunk of the frame is not lent by this [`Xsk`] (a broken
    /// invariant: nothing was taken back).
    #[error("a chunk of the frame is not lent")]
    NotLent,
}

/// A lent frame (or chunk) that was not taken back, handed back with the
/// reason: keep it for another try, or give it to its lender.
#[derive(Debug, thiserror::Error)]
#[error("lent frame not taken back")]
pub struct LentError {
    /// Why.
    #[source]
    pub reason: LentRefusal,
    /// The frame, unchanged.
    pub frame: LentFrame,
}

impl Xsk {
    /// Lends a chunk of the free list to another thread, which may write
    /// into it (see the module doc); `None` if the free list is empty. The
    /// chunk counts as `lent` until [`Self::adopt`] or [`Self::reclaim`]
    /// takes it back.
    pub fn lend(&mut self) -> Option<LentChunk> {
        loop {
            let addr = self.free.pop()?;
            // A free-list entry of a chunk held or lent already is a stray
            // second entry: dropping it is what the accounting wants.
            if self.claims.lend(self.mem.chunk_index(addr)) {
                return Some(LentChunk {
                    mem: Some(Arc::clone(&self.mem)),
                    addr,
                });
            }
        }
    }

    /// Adds a frame written into chunks this [`Xsk`] lent to `batch`, as if
    /// received: its packet comes last, with the written bytes as its data
    /// (a first chunk and continuations), verdict drop, and goes through
    /// [`Self::frames`], [`RxBatch::set_bounds`], verdicts and
    /// [`Self::complete`] like the others (`RxBatch::socket` still names the
    /// socket the batch was received from). Chunks of the frame the data
    /// does not use go to the free list. Refused, handing the frame back, as
    /// [`LentRefusal`] says.
    pub fn adopt(&mut self, frame: LentFrame, batch: &mut RxBatch) -> Result<(), LentError> {
        let data = frame.data();
        let used = data.map_or(0, |d| d.chunks());
        let refusal = if batch.owner != self.id {
            Some(LentRefusal::ForeignBatch)
        } else if !frame.is_from(&self.mem) {
            Some(LentRefusal::Foreign)
        } else if used == 0 {
            Some(LentRefusal::NotWritten)
        } else if used > batch.max_segments {
            Some(LentRefusal::TooManySegments)
        } else if batch.packets.len() >= batch.max_packets
            || batch.descs.len() + used > batch.descs.capacity()
        {
            Some(LentRefusal::BatchFull)
        } else {
            self.lent_check(&frame)
        };
        if let Some(reason) = refusal {
            return Err(LentError { reason, frame });
        }
        let first = batch.descs.len();
        let (addrs, n) = self.take_back(frame);
        let addrs = &addrs[..n];
        for (k, addr) in addrs.iter().enumerate() {
            if k < used {
                self.claims.claim_chunk(self.mem.chunk_index(*addr));
            } else {
                self.free.push(*addr);
            }
        }
        if let Some(data) = data {
            batch.descs.extend(data.descs(&addrs[..used]));
        }
        batch.packets.push(Packet::new(first as u32, used as u16));
        Ok(())
    }

    /// Takes lent chunks back onto the free list, whatever was written into
    /// them: an unused [`LentChunk`] (`chunk.into()`) or a whole
    /// [`LentFrame`]. Returns how many. Refused, handing the frame back,
    /// when it was lent by another [`Xsk`].
    pub fn reclaim(&mut self, lent: impl Into<LentFrame>) -> Result<usize, LentError> {
        let frame = lent.into();
        let refusal = if frame.is_from(&self.mem) {
            self.lent_check(&frame)
        } else {
            Some(LentRefusal::Foreign)
        };
        if let Some(reason) = refusal {
            return Err(LentError { reason, frame });
        }
        let (addrs, n) = self.take_back(frame);
        self.free.extend_from_slice(&addrs[..n]);
        Ok(n)
    }

    /// [`LentRefusal::NotLent`] if a chunk of `frame` is not lent by this
    /// [`Xsk`].
    fn lent_check(&self, frame: &LentFrame) -> Option<LentRefusal> {
        let lent = |i: &u32| self.claims.is_lent(*i as usize);
        (!frame.index[..frame.chunks()].iter().all(lent)).then_some(LentRefusal::NotLent)
    }

    /// Ends the lend of every chunk of `frame` (checked: all lent by this
    /// [`Xsk`]) and disarms its drop count; returns its chunks' base
    /// addresses and how many.
    fn take_back(&mut self, mut frame: LentFrame) -> ([u64; MAX_SEGMENTS], usize) {
        for i in &frame.index[..frame.chunks()] {
            self.claims.unlend(*i as usize);
        }
        let addrs = frame.addrs();
        frame.mem = None;
        (addrs, frame.chunks())
    }
}

// `LentChunk` and `LentFrame` cross threads (the module doc).
const _: () = {
    const fn send<T: Send>() {}
    send::<LentChunk>();
    send::<LentFrame>();
};

#[cfg(test)]
mod tests {
    use super::super::XskConfig;
    use super::*;
    use libxdp_sys::xdp_desc;

    /// A UMEM of 32 chunks of 4 KiB with tx metadata, not registered, and
    /// chunk `i` of it as if lent.
    fn memory() -> Arc<Memory> {
        let mut mem = Memory::map(&XskConfig {
            frame_count: 32,
            ..XskConfig::default()
        })
        .unwrap();
        mem.tx_metadata_len = 24;
        Arc::new(mem)
    }

    fn chunk(mem: &Arc<Memory>, i: u64) -> LentChunk {
        LentChunk {
            mem: Some(Arc::clone(mem)),
            addr: i * 4096,
        }
    }

    #[test]
    fn a_frame_is_written_across_its_chunks_after_the_headroom() {
        let mem = memory();
        let mut f = LentFrame::new();
        assert_eq!(
            f.write(50, &[b"x"]),
            Err(WriteError::NeedChunks { need: 1 })
        );
        f.push(chunk(&mem, 3)).unwrap();
        let bytes: Vec<u8> = (0..9000u32).map(|i| (i % 251) as u8).collect();
        let (a, b) = bytes.split_at(100);
        assert_eq!(
            f.write(50, &[a, b]),
            Err(WriteError::NeedChunks { need: 3 })
        );
        assert_eq!(f.write(50, &[]), Err(WriteError::Empty));
        assert_eq!(f.write(4096 - 24, &[a]), Err(WriteError::Headroom));
        f.push(chunk(&mem, 7)).unwrap();
        f.push(chunk(&mem, 5)).unwrap();
        f.write(50, &[a, b]).unwrap();
        assert_eq!(f.len(), 9000);
        // First chunk from 24 + 50, then from 24 in each further one, filled to the end.
        let descs: Vec<xdp_desc> = f.data().unwrap().descs(&f.addrs()[..3]).collect();
        let shape: Vec<(u64, u32, u32)> =
            descs.iter().map(|d| (d.addr, d.len, d.options)).collect();
        let contd = libc::XDP_PKT_CONTD;
        assert_eq!(
            shape,
            [
                (3 * 4096 + 74, 4022, contd),
                (7 * 4096 + 24, 4072, contd),
                (5 * 4096 + 24, 906, 0)
            ]
        );
        let read: Vec<u8> = descs.iter().flat_map(|d| mem.slice(d).to_vec()).collect();
        assert!(read == bytes);
        // Too large for any number of chunks.
        let big = vec![0u8; 18 * 4072];
        assert_eq!(f.write(50, &[&big]), Err(WriteError::TooLarge));
        assert_eq!(f.len(), 9000, "a refused write keeps what was written");
        // Popping a chunk the data uses forgets the data.
        let last = f.pop().unwrap();
        assert_eq!((f.chunks(), f.len()), (2, 0));
        f.push(last).unwrap();
        let taken: Vec<LentChunk> = std::iter::from_fn(|| f.pop()).collect();
        assert_eq!(taken.len(), 3);
        assert!(f.mem.is_none() && f.pop().is_none());
        for c in taken {
            f.push(c).unwrap();
        }
        drop(f);
        assert_eq!(mem.lent_dropped.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn chunks_of_another_lender_or_past_the_limit_are_handed_back() {
        let (mine, other) = (memory(), memory());
        let mut f = LentFrame::from(chunk(&mine, 0));
        let foreign = f.push(chunk(&other, 0)).unwrap_err();
        for i in 1..MAX_SEGMENTS as u64 {
            f.push(chunk(&mine, i)).unwrap();
        }
        let extra = f.push(chunk(&mine, 20)).unwrap_err();
        assert_eq!(f.chunks(), MAX_SEGMENTS);
        // Dropped without being given back: counted by their lender, for good.
        drop((f, extra));
        assert_eq!(
            mine.lent_dropped.load(Ordering::Relaxed),
            MAX_SEGMENTS as u64 + 1
        );
        drop(foreign);
        assert_eq!(other.lent_dropped.load(Ordering::Relaxed), 1);
    }
}
