//! Pieces of other received packets chained behind a packet (GRO output):
//! [`RxBatch::append_piece`] records that a leader, when forwarded, leaves
//! as its own descriptors followed by byte ranges of its followers' chunks,
//! one descriptor each, in the order appended. Nothing is copied.
//!
//! Owns the rule for who carries which chunk. Guarantees, checked when a
//! piece is appended (a refused piece changes nothing):
//! * a piece lies inside one buffer's data (first chunk or continuation) of
//!   a follower of the same batch, so its descriptor never crosses its chunk
//!   (aligned mode) and leaves the tx metadata room in front;
//! * no chunk carries two pieces, and a leader is never a follower nor a
//!   follower a leader: so every chunk of the batch is in at most one tx
//!   descriptor and comes back through the completion ring exactly once;
//! * a packet spans at most [`MAX_SEGMENTS`] descriptors (1 without
//!   multi-buffer): its own plus its pieces.
//!
//! What [`Xsk::complete`] then does: a follower (a packet some chunk of
//! which carries a piece) is neither sent nor freed on its own, whatever its
//! verdict; each of its chunks leaves with the leader whose piece it carries
//! (the whole chunk travels, the bytes around the piece too, e.g. the
//! follower's headers) and comes back through the completion ring, or goes
//! to the free list when it carries no piece or its leader is dropped. Until
//! then the chunks stay `held` in the accounting like any chunk of a batch.
//!
//! A piece is an address fixed when appended: moving the follower's bounds
//! afterwards does not move it; its bytes are read when transmitted.
//!
//! How the pipeline drives it: the coalescer needs every packet of the
//! batch at once, the leader's first chunk writable (its headers are
//! rewritten in place) and the followers' readable. [`Xsk::frames`] gives
//! exactly that: every [`super::FrameMut`] of a batch is alive together and
//! [`super::FrameMut::into_parts`] lends each first chunk mutably for the
//! whole borrow (a follower's is read through that `&mut`, its continuations
//! as shared slices). Plan and rewrite over those parts, let them go, then
//! append each merge's pieces by index:
//!
//! ```text
//! for m in &plan[..n] {
//!     for p in m.pieces() {
//!         batch.append_piece(m.first(), p.frame.into(), p.buf.into(), p.off as usize, p.len as usize)?;
//!     }
//!     batch.set_verdict(m.first(), Verdict::Forward(pod));
//! }
//! ```

use libxdp_sys::xdp_desc;

use super::batch::{BoundsError, RxBatch};
#[cfg(doc)]
use super::{MAX_SEGMENTS, Xsk};

/// `RxBatch::piece_of` for a descriptor whose chunk carries no piece.
pub(super) const NO_LEADER: u32 = u32::MAX;

/// Why a piece was not appended (per packet: small and `Copy`; the batch is
/// unchanged).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The batch has no packet with this index (leader or follower).
    #[error("no packet with this index in the batch")]
    NoSuchPacket,
    /// The follower has no buffer with this index.
    #[error("the follower has no buffer with this index")]
    NoSuchBuffer,
    /// A packet cannot carry a piece of itself.
    #[error("the leader and the follower are the same packet")]
    SamePacket,
    /// The leader's chunks carry pieces of another leader already.
    #[error("the leader is a follower of another packet")]
    LeaderIsFollower,
    /// The follower carries pieces of other packets behind it already.
    #[error("the follower is a leader")]
    FollowerIsLeader,
    /// This buffer of the follower carries a piece already (its chunk
    /// would be in two descriptors).
    #[error("the buffer carries a piece already")]
    BufferUsed,
    /// The piece is empty or exceeds the buffer's data.
    #[error("the piece lies outside the buffer's data")]
    OutOfData,
    /// The piece's descriptor would start in the tx metadata room.
    #[error("the piece leaves no room for the tx metadata in front")]
    NoMetadataRoom,
    /// The leader would span more descriptors than one packet may.
    #[error("the packet would span more descriptors than one may")]
    TooManySegments,
    /// Another leader's pieces were appended since this leader's last one:
    /// a leader's pieces are appended one after the other.
    #[error("pieces of another leader were appended in between")]
    Interleaved,
}

impl From<BoundsError> for ChainError {
    fn from(e: BoundsError) -> Self {
        match e {
            BoundsError::NoMetadataRoom => Self::NoMetadataRoom,
            BoundsError::NoSuchPacket => Self::NoSuchPacket,
            BoundsError::OutOfChunk => Self::OutOfData,
        }
    }
}

impl RxBatch {
    /// Chains bytes `[off, off + len)` of buffer `buf` of packet `follower`
    /// (0: its first chunk, whose `off` counts from its data offset; n: its
    /// continuation n - 1) behind packet `leader`: when the leader is
    /// forwarded, it leaves as its own descriptors, then its pieces in the
    /// order appended. The follower is then no longer sent or freed on its
    /// own (see the module doc). Refused, changing nothing, as
    /// [`ChainError`] says.
    pub fn append_piece(
        &mut self,
        leader: usize,
        follower: usize,
        buf: usize,
        off: usize,
        len: usize,
    ) -> Result<(), ChainError> {
        let (Some(l), Some(f)) = (self.packets.get(leader), self.packets.get(follower)) else {
            return Err(ChainError::NoSuchPacket);
        };
        if leader == follower {
            return Err(ChainError::SamePacket);
        }
        if l.absorbed {
            return Err(ChainError::LeaderIsFollower);
        }
        if f.npieces > 0 {
            return Err(ChainError::FollowerIsLeader);
        }
        if buf >= usize::from(f.nsegs) {
            return Err(ChainError::NoSuchBuffer);
        }
        if usize::from(l.nsegs) + usize::from(l.npieces) >= self.max_segments {
            return Err(ChainError::TooManySegments);
        }
        if l.npieces > 0 && l.piece_range().end != self.pieces.len() {
            return Err(ChainError::Interleaved);
        }
        let k = f.first as usize + buf;
        let d = self.descs.get(k).ok_or(ChainError::NoSuchBuffer)?;
        if self.piece_of.get(k).is_some_and(|&o| o != NO_LEADER) {
            return Err(ChainError::BufferUsed);
        }
        let piece = piece_of(
            d,
            self.layout.chunk_size,
            self.layout.tx_metadata_len,
            off,
            len,
        )?;
        // Within capacity, no allocation: `descs` never outgrows its
        // capacity (recv and adopt stop there), and each descriptor carries
        // at most one piece.
        self.piece_of.resize(self.descs.len(), NO_LEADER);
        self.piece_of[k] = leader as u32;
        let start = self.pieces.len() as u32;
        self.pieces.push(piece);
        let l = &mut self.packets[leader];
        if l.npieces == 0 {
            l.pieces = start;
        }
        l.npieces += 1;
        self.packets[follower].absorbed = true;
        Ok(())
    }
}

/// The descriptor of bytes `[off, off + len)` of `d`'s data, in a UMEM of
/// `chunk_size` chunks whose first `room` bytes no descriptor may start in.
fn piece_of(
    d: &xdp_desc,
    chunk_size: u64,
    room: usize,
    off: usize,
    len: usize,
) -> Result<xdp_desc, ChainError> {
    let end = off.checked_add(len).ok_or(ChainError::OutOfData)?;
    if len == 0 || end > d.len as usize {
        return Err(ChainError::OutOfData);
    }
    let addr = d.addr + off as u64;
    if ((addr & (chunk_size - 1)) as usize) < room {
        return Err(ChainError::NoMetadataRoom);
    }
    Ok(xdp_desc {
        addr,
        len: len as u32,
        options: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::super::MAX_SEGMENTS;
    use super::super::batch::tests::{batch, desc};
    use super::*;

    /// Packets: 0 (one chunk), 1 (three chunks), 2 and 3 (one chunk each).
    fn four() -> RxBatch {
        let c = |i: u64, len| desc(i * 4096 + 320, len);
        batch(
            vec![
                c(0, 1500),
                c(1, 3776),
                c(2, 3776),
                c(3, 100),
                c(4, 1500),
                c(5, 1500),
            ],
            &[(0, 1), (1, 3), (4, 1), (5, 1)],
        )
    }

    #[test]
    fn pieces_chain_behind_their_leader_in_order() {
        let mut b = four();
        b.append_piece(0, 1, 0, 54, 3776 - 54).unwrap();
        b.append_piece(0, 1, 1, 0, 3776).unwrap();
        b.append_piece(0, 1, 2, 0, 100).unwrap();
        b.append_piece(0, 2, 0, 54, 1446).unwrap();
        assert_eq!(b.packets[0].piece_range(), 0..4);
        let addrs: Vec<(u64, u32)> = b.pieces.iter().map(|d| (d.addr, d.len)).collect();
        assert_eq!(
            addrs,
            [
                (4096 + 374, 3722),
                (8192 + 320, 3776),
                (12288 + 320, 100),
                (16384 + 374, 1446)
            ]
        );
        assert!(b.packets[1].absorbed && b.packets[2].absorbed && !b.packets[3].absorbed);
        assert_eq!(&b.piece_of[..], &[NO_LEADER, 0, 0, 0, 0, NO_LEADER]);
        assert_eq!(b.append_piece(3, 1, 0, 0, 1), Err(ChainError::BufferUsed));
        assert_eq!(
            b.append_piece(2, 3, 0, 0, 10),
            Err(ChainError::LeaderIsFollower)
        );
        assert_eq!(
            b.append_piece(3, 0, 0, 0, 10),
            Err(ChainError::FollowerIsLeader)
        );
    }

    #[test]
    fn refused_pieces_change_nothing() {
        let mut b = four();
        b.append_piece(0, 2, 0, 54, 100).unwrap();
        let cases = [
            ((0, 9, 0, 0, 1), ChainError::NoSuchPacket),
            ((9, 1, 0, 0, 1), ChainError::NoSuchPacket),
            ((1, 1, 0, 0, 1), ChainError::SamePacket),
            ((0, 1, 3, 0, 1), ChainError::NoSuchBuffer),
            ((0, 2, 0, 200, 1), ChainError::BufferUsed),
            ((0, 1, 0, 0, 0), ChainError::OutOfData),
            ((0, 1, 0, 3000, 777), ChainError::OutOfData),
            ((0, 1, 0, usize::MAX, 2), ChainError::OutOfData),
            ((2, 1, 0, 0, 1), ChainError::LeaderIsFollower),
            ((1, 0, 0, 0, 1), ChainError::FollowerIsLeader),
        ];
        for ((l, f, buf, off, len), want) in cases {
            assert_eq!(
                b.append_piece(l, f, buf, off, len),
                Err(want),
                "{l} {f} {buf} {off} {len}"
            );
        }
        assert_eq!(b.pieces.len(), 1);
        assert!(!b.packets[1].absorbed && !b.packets[3].absorbed);
        // Interleaving: leader 3 takes a piece, then leader 0 may not add more.
        b.append_piece(3, 1, 0, 0, 1).unwrap();
        assert_eq!(b.append_piece(0, 1, 1, 0, 1), Err(ChainError::Interleaved));
        // A piece in the tx metadata room (a follower's window moved to the chunk start).
        b.descs[3].addr = 3 * 4096;
        assert_eq!(
            b.append_piece(3, 1, 2, 0, 10),
            Err(ChainError::NoMetadataRoom)
        );
    }

    #[test]
    fn a_packet_spans_at_most_max_segments_descriptors() {
        let n = MAX_SEGMENTS + 2;
        let descs = (0..n as u64).map(|i| desc(i * 4096 + 320, 200)).collect();
        let packets: Vec<(u32, u16)> = (0..n as u32).map(|i| (i, 1)).collect();
        let mut b = batch(descs, &packets);
        for f in 1..MAX_SEGMENTS {
            b.append_piece(0, f, 0, 54, 146).unwrap();
        }
        assert_eq!(
            b.append_piece(0, MAX_SEGMENTS, 0, 54, 146),
            Err(ChainError::TooManySegments)
        );
        b.max_segments = 1;
        assert_eq!(
            b.append_piece(MAX_SEGMENTS, MAX_SEGMENTS + 1, 0, 0, 1),
            Err(ChainError::TooManySegments)
        );
    }
}
