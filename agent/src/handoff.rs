//! Cross-worker handoff: frames one worker received but another must handle.
//!
//! Two reasons, both per frame and both through the same rings:
//! * [`HandoffKind::Process`]: the frame's connection belongs to another worker
//!   ([`sluice_dataplane::steer::owner`]); it goes raw, with its ingress port, and the owner runs the pipeline.
//! * [`HandoffKind::Transmit`]: the pipeline's verdict names a port whose socket only another
//!   worker has; the processed frame goes with its egress port and that worker transmits it.
//!
//! Between every ordered pair of workers (i -> j) there is one bounded lock-free ring of full
//! buffers (i produces, j consumes) and one of free buffers (j gives back, i takes): crossbeam's
//! bounded array channel, used with `try_send`/`try_recv` only, one sender and one receiver, so
//! it is a single-producer single-consumer ring that never blocks, never takes a lock (its waker
//! lists are empty because nobody blocks) and never allocates. The buffers ([`HandoffFrame`]) come
//! in two sizes, each with its own free ring: [`SMALL_SLOTS`] for frames up to [`SMALL_FRAME`]
//! (anything from the underlay, jumbo frames included) and [`LARGE_SLOTS`] for frames up to
//! [`MAX_FRAME`] (same-node pod traffic at the 64 KiB pod MTU); a small frame takes a large buffer
//! when the small ones are all in flight. They are allocated once by [`mesh`] and only move
//! between the rings; their pages are touched only as frames fill them. A full ring (every buffer
//! of the pair in flight) drops the frame with a counted reason.
//!
//! The receiving worker drains its rings every loop (the agent's `xsk_io`), and producers wake a
//! peer's mio `Waker` once per batch, not per frame ([`Handoff::wake_peers`]).

use std::sync::{Arc, OnceLock};

use crossbeam_channel::{Receiver, Sender};
use mio::Waker;

use super::tables::PortId;
use sluice_dataplane::frame::TxChecksum;

/// Bytes in front of a handed-off frame, for a VXLAN encapsulation by the receiving pipeline.
pub const HEADROOM: usize = 256;
/// The largest frame a handoff carries: a 65535-byte IP packet in an Ethernet frame, plus slack.
pub const MAX_FRAME: usize = 65_535 + 64;
/// The largest frame a small buffer carries (a 9000-byte underlay MTU frame fits).
pub const SMALL_FRAME: usize = 9216;
/// Small buffers per ordered pair of workers.
pub const SMALL_SLOTS: usize = 1024;
/// Large buffers per ordered pair of workers.
pub const LARGE_SLOTS: usize = 64;

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
    /// The peer's ring is full or every buffer of the pair is in flight.
    Full,
    /// The frame is larger than [`MAX_FRAME`].
    TooLarge,
    /// No such peer (or the peer is this worker).
    NoPeer,
}

/// One preallocated frame buffer.
#[derive(Debug)]
pub struct HandoffFrame {
    buf: Box<[u8]>,
    off: usize,
    len: usize,
    pub kind: HandoffKind,
    pub port: PortId,
    /// A `Transmit` frame whose checksum the transmitter must complete (see `Frame::tx_checksum`).
    pub csum: Option<TxChecksum>,
}

impl HandoffFrame {
    fn new(capacity: usize) -> Box<Self> {
        Box::new(Self {
            buf: vec![0u8; HEADROOM + capacity].into_boxed_slice(),
            off: HEADROOM,
            len: 0,
            kind: HandoffKind::Process,
            port: PortId(0),
            csum: None,
        })
    }

    fn is_small(&self) -> bool {
        self.buf.len() <= HEADROOM + SMALL_FRAME
    }

    /// Copy `parts` (in order, fitting the buffer) behind the headroom.
    fn fill(&mut self, kind: HandoffKind, port: PortId, csum: Option<TxChecksum>, parts: &[&[u8]]) {
        let mut at = HEADROOM;
        for p in parts {
            if let Some(d) = self.buf.get_mut(at..at + p.len()) {
                d.copy_from_slice(p);
            }
            at += p.len();
        }
        self.off = HEADROOM;
        self.len = at.min(self.buf.len()) - HEADROOM;
        self.kind = kind;
        self.port = port;
        self.csum = csum;
    }

    /// The frame's bytes.
    pub fn data(&self) -> &[u8] {
        self.buf.get(self.off..self.off + self.len).unwrap_or(&[])
    }

    /// The frame's bytes, writable.
    pub fn data_mut(&mut self) -> &mut [u8] {
        self.buf
            .get_mut(self.off..self.off + self.len)
            .unwrap_or(&mut [])
    }

    /// The whole buffer and the frame's window in it (for running the pipeline in place).
    pub fn window_mut(&mut self) -> (&mut [u8], usize, usize) {
        (&mut self.buf, self.off, self.len)
    }

    /// Move the frame's window (after the pipeline pushed or pulled headers).
    pub fn set_window(&mut self, off: usize, len: usize) {
        if off
            .checked_add(len)
            .is_some_and(|end| end <= self.buf.len())
        {
            self.off = off;
            self.len = len;
        }
    }
}

type Slot = Box<HandoffFrame>;

/// i -> j, at i.
#[derive(Debug)]
struct Lane {
    full: Sender<Slot>,
    free_small: Receiver<Slot>,
    free_large: Receiver<Slot>,
    /// Frames sent since the peer was last woken.
    unwoken: bool,
}

/// i -> j, at j.
#[derive(Debug)]
struct Inbox {
    full: Receiver<Slot>,
    free_small: Sender<Slot>,
    free_large: Sender<Slot>,
}

/// The workers' mio wakers, set by the agent once each worker runs (a worker whose waker is not
/// set yet is not woken; it finds the frames at its next loop, within its idle timeout).
pub type Wakers = Arc<[OnceLock<Arc<Waker>>]>;

/// One worker's ends of the handoff rings.
#[derive(Debug)]
pub struct Handoff {
    pub worker: usize,
    pub workers: usize,
    out: Vec<Option<Lane>>,
    inbox: Vec<Option<Inbox>>,
    wakers: Wakers,
}

/// The rings between `workers` workers, [`SMALL_SLOTS`] and [`LARGE_SLOTS`] buffers per ordered
/// pair: each worker's [`Handoff`] (index = worker id) and the waker table to fill.
pub fn mesh(workers: usize) -> (Vec<Handoff>, Wakers) {
    mesh_with(workers, SMALL_SLOTS, LARGE_SLOTS)
}

/// [`mesh`] with `small` and `large` buffers per pair.
pub fn mesh_with(workers: usize, small: usize, large: usize) -> (Vec<Handoff>, Wakers) {
    let wakers: Wakers = (0..workers).map(|_| OnceLock::new()).collect();
    let mut ends: Vec<Handoff> = (0..workers)
        .map(|w| Handoff {
            worker: w,
            workers,
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
            let (full_tx, full_rx) = crossbeam_channel::bounded((small + large).max(1));
            let (small_tx, small_rx) = crossbeam_channel::bounded(small.max(1));
            let (large_tx, large_rx) = crossbeam_channel::bounded(large.max(1));
            for _ in 0..small {
                let _ = small_tx.try_send(HandoffFrame::new(SMALL_FRAME));
            }
            for _ in 0..large {
                let _ = large_tx.try_send(HandoffFrame::new(MAX_FRAME));
            }
            ends[i].out[j] = Some(Lane {
                full: full_tx,
                free_small: small_rx,
                free_large: large_rx,
                unwoken: false,
            });
            ends[j].inbox[i] = Some(Inbox {
                full: full_rx,
                free_small: small_tx,
                free_large: large_tx,
            });
        }
    }
    (ends, wakers)
}

impl Handoff {
    /// Copy a frame (`parts` in order) to worker `to`. Never blocks, never allocates.
    pub fn send(
        &mut self,
        to: usize,
        kind: HandoffKind,
        port: PortId,
        csum: Option<TxChecksum>,
        parts: &[&[u8]],
    ) -> Result<(), HandoffError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > MAX_FRAME {
            return Err(HandoffError::TooLarge);
        }
        let lane = self
            .out
            .get_mut(to)
            .and_then(Option::as_mut)
            .ok_or(HandoffError::NoPeer)?;
        // Every buffer of the pair that fits in the full ring or at the peer: the ring is full.
        let slot = if len <= SMALL_FRAME {
            lane.free_small
                .try_recv()
                .or_else(|_| lane.free_large.try_recv())
        } else {
            lane.free_large.try_recv()
        };
        let Ok(mut slot) = slot else {
            return Err(HandoffError::Full);
        };
        slot.fill(kind, port, csum, parts);
        // The full ring holds as many as the pair has buffers and one is in our hand, so it has
        // room; it only fails if the peer is gone (then the buffer goes with it).
        lane.full.try_send(slot).map_err(|_| HandoffError::NoPeer)?;
        lane.unwoken = true;
        Ok(())
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

    /// The next frame from worker `from`, if any. Give it back with [`Handoff::release`].
    pub fn recv(&mut self, from: usize) -> Option<Box<HandoffFrame>> {
        self.inbox
            .get(from)
            .and_then(Option::as_ref)?
            .full
            .try_recv()
            .ok()
    }

    /// Return a buffer received from `from` to its pool.
    pub fn release(&mut self, from: usize, slot: Box<HandoffFrame>) {
        if let Some(inbox) = self.inbox.get(from).and_then(Option::as_ref) {
            // Each free ring holds all buffers of its size, so this cannot be full.
            let free = if slot.is_small() {
                &inbox.free_small
            } else {
                &inbox.free_large
            };
            let _ = free.try_send(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_cross_in_order_and_buffers_come_back() {
        let (mut ends, _) = mesh_with(3, 4, 0);
        let mut b = ends.pop().unwrap();
        let _c = ends.pop();
        let mut a = ends.pop().unwrap();
        assert_eq!((a.worker, b.worker), (0, 2));
        for k in 0..4u8 {
            a.send(2, HandoffKind::Process, PortId(7), None, &[&[k, 1], &[2]])
                .unwrap();
        }
        // Four small buffers per pair and no large one: the fifth finds none.
        assert_eq!(
            a.send(2, HandoffKind::Process, PortId(7), None, &[&[9]]),
            Err(HandoffError::Full)
        );
        assert_eq!(
            a.send(0, HandoffKind::Process, PortId(7), None, &[&[9]]),
            Err(HandoffError::NoPeer)
        );
        assert!(b.recv(1).is_none());
        for k in 0..4u8 {
            let f = b.recv(0).unwrap();
            assert_eq!(f.data(), &[k, 1, 2]);
            assert_eq!((f.kind, f.port), (HandoffKind::Process, PortId(7)));
            b.release(0, f);
        }
        assert!(b.recv(0).is_none());
        // Released buffers are usable again.
        a.send(2, HandoffKind::Transmit, PortId(3), None, &[&[5; 100]])
            .unwrap();
        let f = b.recv(0).unwrap();
        assert_eq!((f.data().len(), f.kind), (100, HandoffKind::Transmit));
        b.release(0, f);
        // A frame larger than a small buffer needs a large one, and this pair has none.
        let big = vec![1u8; SMALL_FRAME + 1];
        assert_eq!(
            a.send(2, HandoffKind::Process, PortId(7), None, &[&big]),
            Err(HandoffError::Full)
        );
    }

    #[test]
    fn small_frames_fall_back_to_large_buffers_and_return_to_their_pool() {
        let (mut ends, _) = mesh_with(2, 1, 1);
        let mut b = ends.pop().unwrap();
        let mut a = ends.pop().unwrap();
        a.send(1, HandoffKind::Process, PortId(1), None, &[&[1]])
            .unwrap();
        a.send(1, HandoffKind::Process, PortId(1), None, &[&[2]])
            .unwrap();
        assert_eq!(
            a.send(1, HandoffKind::Process, PortId(1), None, &[&[3]]),
            Err(HandoffError::Full)
        );
        let f1 = b.recv(0).unwrap();
        let f2 = b.recv(0).unwrap();
        assert!(f1.is_small() && !f2.is_small());
        b.release(0, f2);
        // Only the large buffer is back: a large frame fits, the small pool is still empty.
        let big = vec![0u8; SMALL_FRAME + 1];
        a.send(1, HandoffKind::Process, PortId(1), None, &[&big])
            .unwrap();
        assert_eq!(
            a.send(1, HandoffKind::Process, PortId(1), None, &[&[4]]),
            Err(HandoffError::Full)
        );
        b.release(0, f1);
        a.send(1, HandoffKind::Process, PortId(1), None, &[&[4]])
            .unwrap();
    }

    #[test]
    fn too_large_frames_are_refused_before_taking_a_buffer() {
        let (mut ends, _) = mesh_with(2, 0, 1);
        let mut b = ends.pop().unwrap();
        let mut a = ends.pop().unwrap();
        let big = vec![0u8; MAX_FRAME + 1];
        assert_eq!(
            a.send(1, HandoffKind::Process, PortId(1), None, &[&big]),
            Err(HandoffError::TooLarge)
        );
        // Refused before taking the pair's only buffer.
        assert!(b.recv(0).is_none());
        a.send(
            1,
            HandoffKind::Process,
            PortId(1),
            None,
            &[&big[..MAX_FRAME]],
        )
        .unwrap();
        let mut f = b.recv(0).unwrap();
        assert_eq!(f.data().len(), MAX_FRAME);
        let (buf, off, len) = f.window_mut();
        assert_eq!(
            (buf.len(), off, len),
            (HEADROOM + MAX_FRAME, HEADROOM, MAX_FRAME)
        );
        f.set_window(HEADROOM - 50, 60);
        assert_eq!(f.data().len(), 60);
        f.set_window(usize::MAX, 2);
        assert_eq!(f.data().len(), 60, "a window outside the buffer is refused");
    }
}
