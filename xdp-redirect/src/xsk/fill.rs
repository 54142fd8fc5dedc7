//! Fill shares that follow the traffic: a busy socket's fill ring deepens, an idle one's does not.
//!
//! A chunk on a socket's fill ring is idle until that socket receives, and it cannot be taken
//! back while the socket is quiet. With many sockets on one UMEM (a worker's pods) each socket
//! gets a small fixed share, its *base* (given to [`super::Xsk::open_socket_with`]), which every
//! socket keeps however idle the others are. On top of that a pool of [`super::XskConfig::fill_boost`]
//! chunks is shared among the busy: at every [`super::Xsk::flush`], a socket that received and
//! whose fill ring the kernel drained below half its target doubles its target (up to the fill
//! ring's size; straight to it when the ring ran dry) as far as the pool allows; a socket that
//! received nothing for [`IDLE_FLUSHES`] flushes goes back to its base, and the chunks above it
//! return to the pool as the kernel hands them back with frames (a fill ring cannot be drained
//! from this side).
//!
//! "Drained" is what is still on the fill ring, read from the kernel's consumer index: not the
//! chunks the socket has given and not yet received back, which also counts the frames waiting on
//! its rx ring. A worker takes at most a batch off the rx ring per round, so after a burst that
//! emptied the fill ring (the kernel dropping what followed) most of those chunks are still on
//! the rx ring at the flush, and a ring of two batches or more never looked drained.
//!
//! The pool is counted by what sockets hold, not by their targets: a socket back at its base
//! that still holds boosted chunks keeps them counted until they come back, so the pool never
//! promises chunks the free list does not have.

/// Flushes without a received frame after which a socket's target returns to its base.
pub const IDLE_FLUSHES: u32 = 64;

/// One socket's fill state, as [`next_target`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FillState {
    /// The share the socket always keeps.
    pub base: u32,
    /// What its fill ring is topped up to now (`base..=max`).
    pub target: u32,
    /// Chunks given and not yet received back: on its fill ring, or filled by the kernel and
    /// waiting on its rx ring.
    pub out: u64,
    /// Of `out`, the chunks still on its fill ring (the kernel has not taken them).
    pub queued: u64,
    /// Descriptors it received since the last flush.
    pub received: u64,
    /// Consecutive flushes without a received descriptor.
    pub idle: u32,
}

/// The chunks above its base a socket holds or is promised.
pub fn boost_held(s: &FillState) -> u64 {
    s.out
        .max(u64::from(s.target))
        .saturating_sub(u64::from(s.base))
}

/// The socket's next target and idle count, given the fill ring's size `max` and the pool chunks
/// no socket holds, `room`. The target stays within `base..=max.max(base)` and grows by at most
/// `room`.
pub fn next_target(s: &FillState, max: u32, room: u64) -> (u32, u32) {
    let max = max.max(s.base);
    if s.received == 0 {
        let idle = s.idle.saturating_add(1);
        let target = if idle >= IDLE_FLUSHES {
            s.base
        } else {
            s.target
        };
        return (target.clamp(s.base, max), idle);
    }
    let target = s.target.clamp(s.base, max);
    if s.queued * 2 >= u64::from(target) || target >= max {
        return (target, 0);
    }
    // The kernel took more than half the ring before this flush: deepen it; to the whole ring if
    // it ran dry (frames were dropped for want of a chunk).
    let want = if s.queued == 0 {
        u64::from(max)
    } else {
        u64::from(target).saturating_mul(2).min(u64::from(max))
    };
    let grow = want.saturating_sub(u64::from(target)).min(room);
    (target + grow as u32, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A socket whose rx ring is empty: everything given is still on the fill ring.
    fn st(base: u32, target: u32, out: u64, received: u64, idle: u32) -> FillState {
        FillState {
            base,
            target,
            out,
            queued: out,
            received,
            idle,
        }
    }

    #[test]
    fn a_fill_ring_drained_into_a_full_rx_ring_deepens() {
        // A burst took all 512 chunks of the fill ring; the worker has taken one batch (64) off
        // the rx ring, 448 frames wait there: 448 still out, none on the fill ring. It ran dry:
        // the whole ring, as far as the pool allows.
        let s = FillState {
            queued: 0,
            ..st(64, 512, 448, 64, 0)
        };
        assert_eq!(next_target(&s, 2048, 10_000), (2048, 0));
        assert_eq!(next_target(&s, 2048, 700), (1212, 0));
        // Drained below half, not dry: doubles.
        let s = FillState {
            queued: 100,
            ..st(64, 512, 448, 64, 0)
        };
        assert_eq!(next_target(&s, 2048, 10_000), (1024, 0));
        // Half of the fill ring still there: the ring was deep enough.
        let s = FillState {
            queued: 256,
            ..st(64, 512, 448, 64, 0)
        };
        assert_eq!(next_target(&s, 2048, 10_000), (512, 0));
    }

    #[test]
    fn a_drained_ring_doubles_within_the_pool() {
        assert_eq!(next_target(&st(64, 64, 10, 54, 0), 2048, 10_000), (128, 0));
        assert_eq!(
            next_target(&st(64, 1024, 0, 900, 0), 2048, 10_000),
            (2048, 0)
        );
        assert_eq!(next_target(&st(64, 1024, 0, 900, 0), 2048, 100), (1124, 0));
        assert_eq!(
            next_target(&st(64, 64, 0, 64, 0), 2048, 0),
            (64, 0),
            "empty pool"
        );
        assert_eq!(
            next_target(&st(64, 2048, 0, 2048, 0), 2048, 10_000),
            (2048, 0),
            "at the ring size"
        );
    }

    #[test]
    fn a_ring_the_kernel_barely_touched_stays() {
        assert_eq!(
            next_target(&st(64, 256, 200, 56, 3), 2048, 10_000),
            (256, 0)
        );
    }

    #[test]
    fn an_idle_socket_returns_to_its_base() {
        let mut s = st(64, 1024, 1024, 0, 0);
        for k in 1..IDLE_FLUSHES {
            let (t, idle) = next_target(&s, 2048, 0);
            assert_eq!((t, idle), (1024, k));
            s.idle = idle;
        }
        assert_eq!(next_target(&s, 2048, 0), (64, IDLE_FLUSHES));
        // Its boosted chunks still count against the pool until they come back.
        s.target = 64;
        assert_eq!(boost_held(&s), 960);
        s.out = 10;
        assert_eq!(boost_held(&s), 0);
    }

    proptest! {
        #[test]
        fn the_target_stays_in_bounds_and_grows_within_the_pool(
            base in 0u32..512, target in 0u32..4096, out in 0u64..4096, received in 0u64..4096,
            idle in 0u32..100, max in 1u32..4096, room in 0u64..8192, queued_share in 0u64..=100,
        ) {
            let s = FillState {
                queued: out * queued_share / 100,
                ..st(base, target, out, received, idle)
            };
            let (t, i) = next_target(&s, max, room);
            prop_assert!(t >= base && t <= max.max(base));
            prop_assert!(u64::from(t) <= u64::from(target.clamp(base, max.max(base))) + room);
            prop_assert_eq!(i == 0, received > 0);
        }
    }
}
