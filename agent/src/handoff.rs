//! Cross-worker handoff: frames one worker received but another must handle, copied once, straight
//! into the receiving worker's UMEM.
//!
//! Two reasons, both per frame and both through the same rings:
//! * [`HandoffKind::Process`]: the frame's connection belongs to another worker (the pipeline's
//!   `Verdict::Steer`); it goes raw, with its ingress port, and the owner runs the pipeline on it
//!   (without steering it again).
//! * [`HandoffKind::Transmit`]: the pipeline's verdict names a port whose socket only another
//!   worker has; the processed frame goes with its egress port (and its checksum request) and that
//!   worker transmits it.
//!
//! One copy: every worker lends chunks of its own UMEM to each peer ([`Handoff::lend`], kept at
//! [`LEND_PER_PEER`] chunks per peer). A sender writes a frame into chunks the receiver lent it
//! (`LentFrame::write`, the only copy) and queues it; the receiver adopts it into a receive batch
//! (`Xsk::adopt`) and from there it is an ordinary received packet: processed in place, forwarded
//! by moving its descriptors, its chunks back on the receiver's free list when transmitted or
//! dropped. So no memory is set aside for handoff beyond the lent chunks, which come out of the
//! receivers' UMEMs, and the rings between each ordered pair of workers hold small entries: the
//! memory grows linearly with the workers (their UMEMs), the rings with their square.
//!
//! Between each ordered pair i -> j there are two single-producer single-consumer rings (`rtrb`):
//! j's lent chunks going to i, and i's frames going to j. Neither side ever blocks, takes a lock or
//! allocates; a frame finds no chunk or no ring room: it is dropped with a counted reason. The
//! receiving worker drains its rings every round; producers wake a peer's mio `Waker` once per
//! batch, not per frame ([`Handoff::wake_peers`]).

use std::sync::{Arc, OnceLock};

use arrayvec::ArrayVec;
use mio::Waker;
use sluice_dataplane::frame::TxChecksum;
use sluice_xdp::xsk::MAX_SEGMENTS;
use sluice_xdp::{LentChunk, LentFrame, WriteError, Xsk};

use super::tables::PortId;

/// Bytes in front of a handed-off frame, for a VXLAN encapsulation by the receiving pipeline.
pub const HEADROOM: usize = 64;
/// The share of a worker's UMEM it lends to its peers, all together: a quarter.
pub const LEND_SHARE: usize = 4;

/// Chunks each worker keeps lent to each peer, with UMEMs of `umem_frames` chunks and `workers`
/// workers: a quarter of the UMEM split among the peers, between 64 and 4096 (two workers with
/// the agent's 16384-chunk UMEMs: 4096, 64 frames of 64 KiB; sixteen: 273). The rings of a pair
/// hold as many entries.
pub fn lend_per_peer(umem_frames: usize, workers: usize) -> usize {
    (umem_frames / LEND_SHARE / workers.saturating_sub(1).max(1)).clamp(64, 4096)
}

/// Why a frame was handed off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandoffKind {
    /// Raw as received on `port`: the receiver runs the pipeline.
    Process,
    /// Processed: the receiver transmits it on `port`.
    Transmit,
}

/// Why a handoff did not happen (the frame is dropped and counted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandoffError {
    /// The peer has lent no chunk left (it has not caught up) or its frame ring is full.
    Full,
    /// The frame needs more chunks than one packet may span.
    TooLarge,
    /// No such peer (or the peer is this worker).
    NoPeer,
}

/// One frame from a peer, in chunks this worker lent: adopt it (`Xsk::adopt`).
#[derive(Debug)]
pub struct Handed {
    pub frame: LentFrame,
    pub kind: HandoffKind,
    pub port: PortId,
    /// A `Transmit` frame whose checksum the transmitter must complete (see `Frame::tx_checksum`).
    pub csum: Option<TxChecksum>,
}

/// i -> j, at i: j's chunks to write into, and the ring to j.
#[derive(Debug)]
struct Lane {
    stock: rtrb::Consumer<LentChunk>,
    /// Chunks taken from `stock` that a frame did not use (reused first).
    spare: ArrayVec<LentChunk, MAX_SEGMENTS>,
    frames: rtrb::Producer<Handed>,
    /// Frames sent since the peer was last woken.
    unwoken: bool,
}

/// i -> j, at j: frames from i, and the ring that lends i chunks.
#[derive(Debug)]
struct Inbox {
    frames: rtrb::Consumer<Handed>,
    lend: rtrb::Producer<LentChunk>,
    /// Chunks lent to i and not back in a frame yet.
    outstanding: usize,
}

/// The workers' mio wakers, set by the agent once each worker runs (a worker whose waker is not
/// set yet is not woken; it finds the frames at its next loop, within its idle timeout).
pub type Wakers = Arc<[OnceLock<Arc<Waker>>]>;

/// One worker's ends of the handoff rings.
#[derive(Debug)]
pub struct Handoff {
    pub worker: usize,
    pub workers: usize,
    /// Chunks kept lent to each peer.
    lend_target: usize,
    out: Vec<Option<Lane>>,
    inbox: Vec<Option<Inbox>>,
    wakers: Wakers,
}

/// The rings between `workers` workers whose UMEMs have `umem_frames` chunks: each worker's
/// [`Handoff`] (index = worker id) and the waker table to fill. Nothing is lent yet: each worker
/// lends from its own UMEM on its first round ([`Handoff::lend`]).
pub fn mesh(workers: usize, umem_frames: usize) -> (Vec<Handoff>, Wakers) {
    let lend_target = lend_per_peer(umem_frames, workers);
    let wakers: Wakers = (0..workers).map(|_| OnceLock::new()).collect();
    let mut ends: Vec<Handoff> = (0..workers)
        .map(|w| Handoff {
            worker: w,
            workers,
            lend_target,
            out: (0..workers).map(|_| None).collect(),
            inbox: (0..workers).map(|_| None).collect(),
            wakers: wakers.clone(),
        })
        .collect();
    for i in 0..workers {
        for j in 0..workers {
            if i == j {
                continue;
            }
            let (lend, stock) = rtrb::RingBuffer::new(lend_target);
            let (frames_tx, frames_rx) = rtrb::RingBuffer::new(lend_target);
            ends[i].out[j] = Some(Lane {
                stock,
                spare: ArrayVec::new(),
                frames: frames_tx,
                unwoken: false,
            });
            ends[j].inbox[i] = Some(Inbox {
                frames: frames_rx,
                lend,
                outstanding: 0,
            });
        }
    }
    (ends, wakers)
}

impl Handoff {
    /// Top up every peer's stock of this worker's chunks to [`lend_per_peer`], lending them from
    /// `xsk` (this worker's UMEM). Stops early when the UMEM has no free chunk.
    pub fn lend(&mut self, xsk: &mut Xsk) {
        for inbox in self.inbox.iter_mut().flatten() {
            while inbox.outstanding < self.lend_target && inbox.lend.slots() > 0 {
                let Some(chunk) = xsk.lend() else {
                    return;
                };
                if let Err(rtrb::PushError::Full(chunk)) = inbox.lend.push(chunk) {
                    // Not reached (room checked above): give it back.
                    let _ = xsk.reclaim(chunk);
                    break;
                }
                inbox.outstanding += 1;
            }
        }
    }

    /// Copy a frame (`parts` in order) into chunks worker `to` lent this one and queue it there.
    /// Never blocks, never allocates.
    pub fn send(
        &mut self,
        to: usize,
        kind: HandoffKind,
        port: PortId,
        csum: Option<TxChecksum>,
        parts: &[&[u8]],
    ) -> Result<(), HandoffError> {
        let lane = self
            .out
            .get_mut(to)
            .and_then(Option::as_mut)
            .ok_or(HandoffError::NoPeer)?;
        if lane.frames.is_full() {
            return Err(HandoffError::Full);
        }
        let mut frame = LentFrame::new();
        loop {
            match frame.write(HEADROOM, parts) {
                Ok(()) => break,
                Err(WriteError::NeedChunks { need }) if need <= MAX_SEGMENTS => {
                    while frame.chunks() < need {
                        let chunk = match lane.spare.pop() {
                            Some(c) => c,
                            None => match lane.stock.pop() {
                                Ok(c) => c,
                                Err(_) => {
                                    keep_spare(lane, frame);
                                    return Err(HandoffError::Full);
                                }
                            },
                        };
                        if let Err(c) = frame.push(chunk) {
                            // Chunks of one lender always go together: not reached.
                            drop(c);
                            keep_spare(lane, frame);
                            return Err(HandoffError::Full);
                        }
                    }
                }
                Err(_) => {
                    keep_spare(lane, frame);
                    return Err(HandoffError::TooLarge);
                }
            }
        }
        let handed = Handed {
            frame,
            kind,
            port,
            csum,
        };
        match lane.frames.push(handed) {
            Ok(()) => {
                lane.unwoken = true;
                Ok(())
            }
            Err(rtrb::PushError::Full(h)) => {
                keep_spare(lane, h.frame);
                Err(HandoffError::Full)
            }
        }
    }

    /// Wake every peer that received frames since the last call (once per batch).
    pub fn wake_peers(&mut self) {
        for (j, lane) in self.out.iter_mut().enumerate() {
            if let Some(lane) = lane
                && lane.unwoken
            {
                lane.unwoken = false;
                if let Some(w) = self.wakers.get(j).and_then(OnceLock::get) {
                    let _ = w.wake();
                }
            }
        }
    }

    /// The next frame from worker `from`, if any; its chunks are this worker's again (adopt it or
    /// reclaim it).
    pub fn recv(&mut self, from: usize) -> Option<Handed> {
        let inbox = self.inbox.get_mut(from).and_then(Option::as_mut)?;
        let h = inbox.frames.pop().ok()?;
        inbox.outstanding = inbox.outstanding.saturating_sub(h.frame.chunks());
        Some(h)
    }

    /// Chunks this worker has lent to `peer` and not got back.
    pub fn outstanding(&self, peer: usize) -> usize {
        self.inbox
            .get(peer)
            .and_then(Option::as_ref)
            .map_or(0, |i| i.outstanding)
    }
}

/// Keep the chunks of a frame that was not sent for the next one.
fn keep_spare(lane: &mut Lane, mut frame: LentFrame) {
    while let Some(c) = frame.pop() {
        if let Err(c) = lane.spare.try_push(c) {
            // More than one packet's worth: not reached (a frame never holds more).
            drop(c.element());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_xdp::XskConfig;

    fn xsk() -> Option<Xsk> {
        // A UMEM needs CAP_IPC_LOCK beyond RLIMIT_MEMLOCK (root has it).
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var("SLUICE_ALLOW_SKIP").as_deref() == Ok("1"),
                "handoff tests lend UMEM chunks and need root; set SLUICE_ALLOW_SKIP=1 to skip"
            );
            eprintln!("skipped: handoff tests need root (a UMEM)");
            return None;
        }
        Some(
            Xsk::new(&XskConfig {
                frame_count: 1024,
                ..XskConfig::default()
            })
            .expect("a UMEM"),
        )
    }

    #[test]
    fn frames_cross_in_order_in_lent_chunks_and_come_back() {
        let (Some(mut ua), Some(mut uc)) = (xsk(), xsk()) else {
            return;
        };
        let (mut ends, _) = mesh(3, 1024);
        let lend = lend_per_peer(1024, 3);
        assert_eq!(lend, 128);
        let mut c = ends.pop().unwrap();
        let _b = ends.pop();
        let mut a = ends.pop().unwrap();
        assert_eq!((a.worker, c.worker), (0, 2));
        // Nothing lent yet: nothing can be sent.
        assert_eq!(
            a.send(2, HandoffKind::Process, PortId(7), None, &[&[1]]),
            Err(HandoffError::Full)
        );
        c.lend(&mut uc);
        a.lend(&mut ua);
        assert_eq!(c.outstanding(0), lend);
        assert_eq!(uc.accounting().lent, 2 * lend as u64, "to both peers");
        for k in 0..4u8 {
            a.send(2, HandoffKind::Process, PortId(7), None, &[&[k, 1], &[2]])
                .unwrap();
        }
        assert_eq!(
            a.send(0, HandoffKind::Process, PortId(7), None, &[&[9]]),
            Err(HandoffError::NoPeer)
        );
        assert!(c.recv(1).is_none());
        let mut batch = uc.batch();
        for k in 0..4u8 {
            let h = c.recv(0).unwrap();
            assert_eq!((h.kind, h.port), (HandoffKind::Process, PortId(7)));
            uc.adopt(h.frame, &mut batch).unwrap();
            let f = uc.frame(&mut batch, usize::from(k)).unwrap();
            assert_eq!(f.data(), &[k, 1, 2]);
        }
        assert!(c.recv(0).is_none());
        assert_eq!(c.outstanding(0), lend - 4);
        uc.complete(&mut batch).unwrap();
        c.lend(&mut uc);
        assert_eq!(c.outstanding(0), lend, "topped up again");
        // A 64 KiB frame spans several lent chunks.
        let big = vec![3u8; 65_000];
        a.send(2, HandoffKind::Transmit, PortId(3), None, &[&big])
            .unwrap();
        let h = c.recv(0).unwrap();
        assert!(h.frame.chunks() >= 16);
        uc.adopt(h.frame, &mut batch).unwrap();
        let f = uc.frame(&mut batch, 0).unwrap();
        assert_eq!(f.total_len(), 65_000);
        uc.complete(&mut batch).unwrap();
        // More than one packet may span: refused, its chunks kept for the next frame.
        let huge = vec![0u8; 100_000];
        assert_eq!(
            a.send(2, HandoffKind::Process, PortId(1), None, &[&huge]),
            Err(HandoffError::TooLarge)
        );
        a.send(2, HandoffKind::Process, PortId(1), None, &[&[5]])
            .unwrap();
        let acc = uc.accounting();
        assert!(acc.is_balanced(), "{acc:?}");
    }

    #[test]
    fn a_peer_that_lent_everything_out_refuses_until_it_lends_again() {
        let (Some(mut ua), Some(mut ub)) = (xsk(), xsk()) else {
            return;
        };
        let (mut ends, _) = mesh(2, 1024);
        let lend = lend_per_peer(1024, 2);
        let mut b = ends.pop().unwrap();
        let mut a = ends.pop().unwrap();
        a.lend(&mut ua);
        b.lend(&mut ub);
        let frame = vec![1u8; 3000];
        let mut sent = 0;
        while a
            .send(1, HandoffKind::Process, PortId(1), None, &[&frame])
            .is_ok()
        {
            sent += 1;
        }
        assert_eq!(sent, lend, "one chunk per 3000-byte frame");
        let mut batch = ub.batch();
        let mut got = 0;
        while let Some(h) = b.recv(0) {
            if ub.adopt(h.frame, &mut batch).is_err() {
                break;
            }
            got += 1;
            if got % 32 == 0 {
                ub.complete(&mut batch).unwrap();
            }
        }
        ub.complete(&mut batch).unwrap();
        assert_eq!(b.outstanding(0), lend - got);
        assert_eq!(got, sent);
        b.lend(&mut ub);
        a.send(1, HandoffKind::Process, PortId(1), None, &[&frame])
            .unwrap();
    }
}
