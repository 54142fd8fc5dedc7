//! Flow events: what the pipeline tells an observer about the flows it handles, and the bounded
//! single-producer/single-consumer ring a worker writes them into.
//!
//! A worker emits (see `pipeline`):
//! - [`EventKind::NewConnection`]: a new flow was allowed and recorded in conntrack, with the
//!   service it was balanced to and the translated tuple (the chosen backend after DNAT), the
//!   egress port and the policy verdict that allowed it;
//! - [`EventKind::PolicyVerdict`]: a new flow was denied by NetworkPolicy (the event carries the
//!   drop reason and the direction whose isolation denied it, i.e. "default deny");
//! - [`EventKind::Drop`]: any other drop, with its [`DropReason`] and the tuple when parsed;
//! - [`EventKind::ConnectionEnd`]: a TCP flow closed (FIN handshake done or RST), with packet and
//!   byte counts both ways.
//!
//! Emitting never allocates, never blocks and never takes a lock: [`EventProducer::push`] writes
//! one slot of a fixed array, or counts the event as lost when the ring is full.

use std::cell::UnsafeCell;
use std::marker::PhantomData;
use std::mem::MaybeUninit;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::nat::Tuple;
use crate::policy::PolicyVerdict;
use crate::tables::ServiceId;
use crate::verdict::{DropReason, PortId};

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum EventKind {
    NewConnection,
    PolicyVerdict,
    Drop,
    ConnectionEnd,
}

impl EventKind {
    /// Stable name (JSON `kind` field).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NewConnection => "new_connection",
            Self::PolicyVerdict => "policy_verdict",
            Self::Drop => "drop",
            Self::ConnectionEnd => "connection_end",
        }
    }
}

/// Packets and bytes of a flow, both ways (`[original, reply]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCounts {
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
}

/// One flow event. `Copy`, fixed size; written into a ring slot by value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEvent {
    /// The worker's monotonic time of the packet, in nanoseconds.
    pub ts_ns: u64,
    pub kind: EventKind,
    /// The packet's tuple as it arrived (`None` when it did not parse).
    pub tuple: Option<Tuple>,
    /// The tuple after NAT (for a service: the chosen backend in `dst`/`dst_port`).
    pub translated: Option<Tuple>,
    /// The service the flow was balanced to (its VIP:port is `tuple`'s destination).
    pub service: Option<ServiceId>,
    pub ingress: PortId,
    pub egress: Option<PortId>,
    /// The policy verdict for a new flow (allowed by a policy or unisolated, or denied).
    pub policy: Option<PolicyVerdict>,
    pub drop: Option<DropReason>,
    /// For [`EventKind::ConnectionEnd`].
    pub counts: FlowCounts,
}

impl FlowEvent {
    /// An event with only the kind, time and ingress port set.
    pub fn new(kind: EventKind, ts_ns: u64, ingress: PortId) -> Self {
        Self {
            ts_ns,
            kind,
            tuple: None,
            translated: None,
            service: None,
            ingress,
            egress: None,
            policy: None,
            drop: None,
            counts: FlowCounts::default(),
        }
    }

    /// Whether the packet the event is about was dropped.
    pub fn dropped(&self) -> bool {
        self.drop.is_some()
    }
}

/// Where the pipeline writes events (the ring's producer side, or a test's vector).
pub trait EventSink {
    fn emit(&mut self, ev: FlowEvent);
}

struct Shared {
    slots: Box<[UnsafeCell<MaybeUninit<FlowEvent>>]>,
    /// Next slot the producer writes (monotonic; index is `head % capacity`).
    head: AtomicUsize,
    /// Next slot the consumer reads.
    tail: AtomicUsize,
    lost: AtomicU64,
    pushed: AtomicU64,
}

// SAFETY: a slot is written only by the single producer while it is outside [tail, head) and read
// only by the single consumer while it is inside; the Release store of `head` after the write and
// the Acquire load before the read (and symmetrically for `tail`) order the accesses, so no slot is
// ever accessed by both sides at once. `FlowEvent` is `Copy + Send`.
unsafe impl Sync for Shared {}

/// Create a ring of `capacity` events (at least 1) and its two ends.
pub fn ring(capacity: usize) -> (EventProducer, EventConsumer) {
    let capacity = capacity.max(1);
    let slots = (0..capacity)
        .map(|_| UnsafeCell::new(MaybeUninit::uninit()))
        .collect();
    let s = Arc::new(Shared {
        slots,
        head: AtomicUsize::new(0),
        tail: AtomicUsize::new(0),
        lost: AtomicU64::new(0),
        pushed: AtomicU64::new(0),
    });
    (
        EventProducer {
            s: s.clone(),
            _not_sync: PhantomData,
        },
        EventConsumer {
            s,
            _not_sync: PhantomData,
        },
    )
}

/// The writing end (one per worker; `Send`, not `Clone` or `Sync`).
pub struct EventProducer {
    s: Arc<Shared>,
    _not_sync: PhantomData<std::cell::Cell<()>>,
}

/// The reading end (the agent's drain; `Send`, not `Clone` or `Sync`).
pub struct EventConsumer {
    s: Arc<Shared>,
    _not_sync: PhantomData<std::cell::Cell<()>>,
}

impl std::fmt::Debug for EventProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventProducer")
            .field("capacity", &self.s.slots.len())
            .finish()
    }
}

impl std::fmt::Debug for EventConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventConsumer")
            .field("capacity", &self.s.slots.len())
            .finish()
    }
}

impl EventProducer {
    /// Append `ev`, or count it as lost when the ring is full. Never blocks, never allocates.
    #[inline]
    pub fn push(&mut self, ev: FlowEvent) -> bool {
        let s = &*self.s;
        let head = s.head.load(Ordering::Relaxed);
        let tail = s.tail.load(Ordering::Acquire);
        if head.wrapping_sub(tail) >= s.slots.len() {
            s.lost.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let slot = &s.slots[head % s.slots.len()];
        // SAFETY: `head - tail < capacity`, so this slot is not in [tail, head): the consumer does
        // not read it until the Release store below publishes it, and we are the only producer
        // (`EventProducer` is neither `Clone` nor `Sync`, and `push` takes `&mut self`).
        unsafe { (*slot.get()).write(ev) };
        s.head.store(head.wrapping_add(1), Ordering::Release);
        s.pushed.fetch_add(1, Ordering::Relaxed);
        true
    }
}

impl EventSink for EventProducer {
    #[inline]
    fn emit(&mut self, ev: FlowEvent) {
        self.push(ev);
    }
}

impl EventSink for Vec<FlowEvent> {
    fn emit(&mut self, ev: FlowEvent) {
        self.push(ev);
    }
}

impl EventConsumer {
    /// Take the oldest event, if any.
    pub fn pop(&mut self) -> Option<FlowEvent> {
        let s = &*self.s;
        let tail = s.tail.load(Ordering::Relaxed);
        let head = s.head.load(Ordering::Acquire);
        if tail == head {
            return None;
        }
        let slot = &s.slots[tail % s.slots.len()];
        // SAFETY: `tail < head`: the producer wrote this slot before its Release store of `head`
        // (which our Acquire load saw) and does not touch it again until we advance `tail` below.
        let ev = unsafe { (*slot.get()).assume_init_read() };
        s.tail.store(tail.wrapping_add(1), Ordering::Release);
        Some(ev)
    }

    /// Events waiting in the ring.
    pub fn len(&self) -> usize {
        let s = &*self.s;
        s.head
            .load(Ordering::Acquire)
            .wrapping_sub(s.tail.load(Ordering::Relaxed))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.s.slots.len()
    }

    /// Events dropped because the ring was full, since creation.
    pub fn lost(&self) -> u64 {
        self.s.lost.load(Ordering::Relaxed)
    }

    /// Events written, since creation.
    pub fn pushed(&self) -> u64 {
        self.s.pushed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(ts: u64) -> FlowEvent {
        FlowEvent::new(EventKind::Drop, ts, PortId(1))
    }

    #[test]
    fn fifo_and_full_counts_lost() {
        let (mut p, mut c) = ring(4);
        for i in 0..6 {
            let ok = p.push(ev(i));
            assert_eq!(ok, i < 4);
        }
        assert_eq!((c.len(), c.lost(), c.pushed()), (4, 2, 4));
        for i in 0..4 {
            assert_eq!(c.pop().map(|e| e.ts_ns), Some(i));
        }
        assert!(c.pop().is_none());
        assert!(p.push(ev(9)));
        assert_eq!(c.pop().map(|e| e.ts_ns), Some(9));
    }

    #[test]
    fn threads_see_every_event_in_order_or_count_it_lost() {
        let (mut p, mut c) = ring(64);
        const N: u64 = 100_000;
        let t = std::thread::spawn(move || {
            for i in 0..N {
                p.push(ev(i));
            }
        });
        let mut last = None;
        let mut got = 0u64;
        loop {
            match c.pop() {
                Some(e) => {
                    assert!(last.is_none_or(|l| e.ts_ns > l));
                    last = Some(e.ts_ns);
                    got += 1;
                }
                None if t.is_finished() && c.is_empty() => break,
                None => std::thread::yield_now(),
            }
        }
        t.join().unwrap();
        assert_eq!(got + c.lost(), N);
    }
}
