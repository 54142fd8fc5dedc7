//! Connection tracking: one table per worker, fixed capacity, no allocation after construction.
//!
//! This module owns the table of connections a worker has seen. A connection has two keys, the
//! 5-tuple of its original direction and the 5-tuple its replies carry (after NAT they differ, e.g.
//! client->VIP and backend->client); both lead to the same [`CtEntry`], which holds the caller's value
//! (the NAT binding), per-direction counters and the protocol state.
//!
//! # Protocol state and timeouts
//! TCP follows the Linux `nf_conntrack` state table (`nf_conntrack_proto_tcp.c`, states NONE,
//! SYN_SENT, SYN_RECV, ESTABLISHED, FIN_WAIT, CLOSE_WAIT, LAST_ACK, TIME_WAIT, CLOSE, SYN_SENT2) and
//! its flag validity check, without sequence-window tracking. A packet that the table calls invalid
//! leaves the state and the expiry alone and [`CtEntry::on_packet`] answers [`CtState::Invalid`]; a
//! packet it ignores (e.g. a retransmitted SYN/ACK) leaves them alone too and answers the current
//! state.
//!
//! A closed connection is never reopened in place. A SYN (without ACK, either way) that meets an
//! entry in TIME_WAIT or CLOSE starts a new connection over the same 5-tuple
//! ([`CtEntry::is_reopened_by`]): the caller removes the entry and handles the packet as the first
//! of a new flow, so that everything decided for new flows (service choice, NAT, NetworkPolicy) is
//! decided again with the tables of now. Linux does the same: `tcp_packet` kills such an entry and
//! answers `NF_REPEAT`, so the packet is looked up again as NEW ("Attempt to reopen a
//! closed/aborted connection"). [`CtEntry::on_packet`] answers [`CtState::Invalid`] for such a SYN,
//! so a caller that forgot to end the entry drops the packet rather than passes it as established. UDP is unreplied until a packet goes the reply way, then assured. ICMP (echo, keyed by
//! its id) and other protocols have a single state. The timeouts default to Linux's
//! `net.netfilter.nf_conntrack_*_timeout*` defaults; see [`CtTimeouts`].
//!
//! Every packet accounted moves the expiry to `now + timeout(new state)`. An entry is expired when
//! `now >= expiry` (as Linux's `nf_ct_is_expired`); expired entries are misses.
//!
//! # Table
//! Entries live in a preallocated pool of `capacity` slots. Keys are found through an open-addressing
//! index (linear probing with backward-shift deletion, so no tombstones) of at least `4 * capacity`
//! slots, so it is at most half full. A key is always within [`MAX_PROBE`] slots of its home. The
//! hash is XXH3-64 of the key with [`CtConfig::hash_seed`]; set the seed at random per node so that
//! remote hosts cannot aim flows at one probe window.
//!
//! When the pool is full an insert evicts one entry: among the entries referenced by the new key's
//! probe window and the next [`EVICT_SCAN`] pool slots under the sweep hand, an expired one if there
//! is one, else the one with the oldest last packet. If a key's probe window is full of live keys
//! (rare at half load), an entry of that window is evicted the same way. [`ConnTrack::expire`]
//! sweeps a bounded number of pool slots per call; lookups drop the expired entries they meet.
//!
//! # Handles
//! A [`CtHandle`] names a pool slot and its generation. A slot's generation changes whenever its
//! entry is removed, so a handle kept past the removal of its entry reads as `None`, never as another
//! connection (unless the slot is reused 2^32 times in between).
//!
//! # Guarantees
//! No method allocates, reads a clock or panics after [`ConnTrack::new`] (all storage is three boxed
//! slices sized there). A lookup reads at most [`MAX_PROBE`] index slots; an insert at most that
//! per key plus [`EVICT_SCAN`] pool slots, and in the rare full-window case evicts at most
//! [`MAX_PROBE`] entries per key before giving up with [`CtError::Full`]. A removal shifts back the
//! rest of its index cluster, which at half load is a few slots.
//!
//! # Memory
//! 128 bytes per pool slot (for `V` up to 24 bytes) plus 8 bytes per index slot, about 160 bytes
//! per connection of capacity: 1 M connections take about 160 MiB. Random lookups over a table that
//! large are bound by cache and TLB misses; [`ConnTrack::lookup_batch`] overlaps them.
//!
//! # Files
//! The key is [`crate::flow::FlowKey`]; `state` holds the protocol states, their timeouts and the
//! per-connection entry with its TCP state machine; `table` the fixed-capacity table of entries;
//! `view` the read-only view a trace runs the pipeline over ([`CtView`]: lookups that remove
//! nothing, changes kept in the view).

mod state;
mod table;
mod view;

pub use crate::flow::FlowKey;
pub use state::{CtEntry, CtState, CtTimeouts};
pub use table::{ConnTrack, CtConfig, CtError, CtHandle, CtStats};
pub use view::CtView;

/// The longest distance, in index slots, between a key's home slot and where it is stored.
pub const MAX_PROBE: usize = 64;
/// How many keys [`ConnTrack::lookup_batch`] brings into cache together.
pub const LOOKUP_GROUP: usize = 32;
/// How many pool slots an insert into a full pool examines under the sweep hand.
pub const EVICT_SCAN: usize = 32;

/// Nanoseconds per second (timeouts are in nanoseconds).
const NS: u64 = 1_000_000_000;

/// Which way a packet goes relative to the connection's first packet.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(u8)]
pub enum FlowDir {
    Original = 0,
    Reply = 1,
}

impl FlowDir {
    /// The other direction.
    pub fn flip(self) -> FlowDir {
        match self {
            FlowDir::Original => FlowDir::Reply,
            FlowDir::Reply => FlowDir::Original,
        }
    }
}

#[cfg(test)]
mod test_support {
    pub use super::*;
    pub use crate::flow::proto;
    pub use crate::wire::tcp::flags::*;
    pub use FlowDir::{Original as O, Reply as R};

    pub const S: u64 = NS;

    pub fn tcp(i: u32) -> FlowKey {
        FlowKey {
            src: (0x0af4_0000 + i).to_be_bytes(),
            dst: [10, 96, 0, 1],
            src_port: 40000 + (i % 20000) as u16,
            dst_port: 80,
            proto: proto::TCP,
        }
    }

    pub fn udp(i: u32) -> FlowKey {
        FlowKey {
            proto: proto::UDP,
            ..tcp(i)
        }
    }

    pub fn table(cap: usize) -> ConnTrack<u32> {
        ConnTrack::new(CtConfig::with_capacity(cap))
    }

    /// Inserts a TCP flow and accounts its SYN.
    pub fn open(ct: &mut ConnTrack<u32>, k: FlowKey, now: u64) -> CtHandle {
        let h = ct.insert(k, k.reversed(), 7, now).unwrap();
        assert_eq!(
            ct.on_packet(h, FlowDir::Original, Some(SYN), 60, now),
            Some(CtState::TcpSynSent)
        );
        h
    }

    pub fn step(ct: &mut ConnTrack<u32>, h: CtHandle, dir: FlowDir, flags: u8) -> CtState {
        ct.on_packet(h, dir, Some(flags), 60, 1).unwrap()
    }
}
