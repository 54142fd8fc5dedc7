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

/// IP protocol numbers with their own tracking.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
}

/// TCP flag bits of the flags byte (offset 13 of the TCP header).
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
    pub const ECE: u8 = 0x40;
    pub const CWR: u8 = 0x80;
}

/// The longest distance, in index slots, between a key's home slot and where it is stored.
pub const MAX_PROBE: usize = 64;
/// How many keys [`ConnTrack::lookup_batch`] brings into cache together.
pub const LOOKUP_GROUP: usize = 32;
/// How many pool slots an insert into a full pool examines under the sweep hand.
pub const EVICT_SCAN: usize = 32;

const NS: u64 = 1_000_000_000;

/// An IPv4 flow 5-tuple. Addresses are host-order `u32` (`u32::from(Ipv4Addr)`); for ICMP echo both
/// ports hold the echo identifier, so the reply's reversed key matches.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct FlowKey {
    pub src: u32,
    pub dst: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
}

impl FlowKey {
    /// The key of a packet going the other way.
    #[inline]
    pub fn reversed(&self) -> FlowKey {
        FlowKey {
            src: self.dst,
            dst: self.src,
            src_port: self.dst_port,
            dst_port: self.src_port,
            proto: self.proto,
        }
    }

    /// A hash of the key that is the same on every node and version: XXH3-64 with seed 0 of the 13
    /// bytes `src, dst, src_port, dst_port` (big-endian) then `proto`. Used for Maglev backend choice
    /// and the VXLAN source port.
    #[inline]
    pub fn hash64(&self) -> u64 {
        self.hash64_seeded(0)
    }

    /// [`Self::hash64`] with another seed.
    ///
    /// This is XXH3-64's 9-to-16-byte path (default secret) computed straight from the fields: the
    /// same value as `xxh3_64_with_seed(&key_bytes, seed)` (a test checks it against the crate), at
    /// a fraction of the cost, because building the byte array first stalls store forwarding.
    #[inline]
    pub fn hash64_seeded(&self, seed: u64) -> u64 {
        // XXH3 default secret: bytes 24..32 ^ 32..40, and 40..48 ^ 48..56, little-endian.
        const FLIP1: u64 = 0x6782_737b_ea42_39b9;
        const FLIP2: u64 = 0xaf56_bc3b_0996_523a;
        // The 13 bytes read little-endian: bytes 0..8 and bytes 5..13.
        let lo = u64::from(self.src.swap_bytes()) | u64::from(self.dst.swap_bytes()) << 32;
        let hi = lo >> 40
            | u64::from(self.src_port.swap_bytes()) << 24
            | u64::from(self.dst_port.swap_bytes()) << 40
            | u64::from(self.proto) << 56;
        let input_lo = lo ^ FLIP1.wrapping_add(seed);
        let input_hi = hi ^ FLIP2.wrapping_sub(seed);
        let product = u128::from(input_lo) * u128::from(input_hi);
        let mut h = 13u64
            .wrapping_add(input_lo.swap_bytes())
            .wrapping_add(input_hi)
            .wrapping_add(product as u64 ^ (product >> 64) as u64);
        // XXH3 avalanche.
        h ^= h >> 37;
        h = h.wrapping_mul(0x1656_6791_9e37_79f9);
        h ^ (h >> 32)
    }

    /// The 13 bytes [`Self::hash64`] hashes.
    pub fn to_bytes(self) -> [u8; 13] {
        let mut b = [0u8; 13];
        b[0..4].copy_from_slice(&self.src.to_be_bytes());
        b[4..8].copy_from_slice(&self.dst.to_be_bytes());
        b[8..10].copy_from_slice(&self.src_port.to_be_bytes());
        b[10..12].copy_from_slice(&self.dst_port.to_be_bytes());
        b[12] = self.proto;
        b
    }
}

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

/// The state of a connection, or [`CtState::Invalid`] as the answer for a packet the state machine
/// rejects (entries are never in that state).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(u8)]
pub enum CtState {
    /// TCP, created and no packet accounted yet.
    TcpNone,
    TcpSynSent,
    TcpSynRecv,
    TcpEstablished,
    /// A FIN seen.
    TcpFinWait,
    /// The ACK of the first FIN seen.
    TcpCloseWait,
    /// FINs seen both ways.
    TcpLastAck,
    /// The last ACK seen.
    TcpTimeWait,
    /// A RST seen.
    TcpClose,
    /// Simultaneous open: a SYN seen both ways.
    TcpSynSent2,
    /// UDP, no packet seen the reply way.
    UdpUnreplied,
    /// UDP, packets seen both ways.
    UdpAssured,
    /// ICMP echo.
    Icmp,
    /// Any other protocol.
    Generic,
    /// Answer only: the packet is invalid for the connection's state (bad TCP flags, a SYN/ACK from
    /// the client, a TCP packet without flags); the entry is unchanged.
    Invalid,
}

/// Timeouts per state, in nanoseconds. The defaults are Linux's (`nf_conntrack_tcp_timeout_*`,
/// `nf_conntrack_udp_timeout{,_stream}`, `nf_conntrack_icmp_timeout`,
/// `nf_conntrack_generic_timeout`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct CtTimeouts {
    /// SYN_SENT and SYN_SENT2 (and TCP before its first packet): 120 s.
    pub tcp_syn_sent: u64,
    /// SYN_RECV: 60 s.
    pub tcp_syn_recv: u64,
    /// ESTABLISHED: 5 days.
    pub tcp_established: u64,
    /// FIN_WAIT: 120 s.
    pub tcp_fin_wait: u64,
    /// CLOSE_WAIT: 60 s.
    pub tcp_close_wait: u64,
    /// LAST_ACK: 30 s.
    pub tcp_last_ack: u64,
    /// TIME_WAIT: 120 s.
    pub tcp_time_wait: u64,
    /// CLOSE: 10 s.
    pub tcp_close: u64,
    /// UDP unreplied: 30 s.
    pub udp_unreplied: u64,
    /// UDP assured (seen both ways): 120 s.
    pub udp_assured: u64,
    /// ICMP: 30 s.
    pub icmp: u64,
    /// Other protocols: 600 s.
    pub generic: u64,
}

impl Default for CtTimeouts {
    fn default() -> Self {
        Self {
            tcp_syn_sent: 120 * NS,
            tcp_syn_recv: 60 * NS,
            tcp_established: 5 * 24 * 3600 * NS,
            tcp_fin_wait: 120 * NS,
            tcp_close_wait: 60 * NS,
            tcp_last_ack: 30 * NS,
            tcp_time_wait: 120 * NS,
            tcp_close: 10 * NS,
            udp_unreplied: 30 * NS,
            udp_assured: 120 * NS,
            icmp: 30 * NS,
            generic: 600 * NS,
        }
    }
}

impl CtTimeouts {
    /// The timeout of a state ([`CtState::Invalid`] has none and gets 0).
    pub fn of(&self, state: CtState) -> u64 {
        match state {
            CtState::TcpNone | CtState::TcpSynSent | CtState::TcpSynSent2 => self.tcp_syn_sent,
            CtState::TcpSynRecv => self.tcp_syn_recv,
            CtState::TcpEstablished => self.tcp_established,
            CtState::TcpFinWait => self.tcp_fin_wait,
            CtState::TcpCloseWait => self.tcp_close_wait,
            CtState::TcpLastAck => self.tcp_last_ack,
            CtState::TcpTimeWait => self.tcp_time_wait,
            CtState::TcpClose => self.tcp_close,
            CtState::UdpUnreplied => self.udp_unreplied,
            CtState::UdpAssured => self.udp_assured,
            CtState::Icmp => self.icmp,
            CtState::Generic => self.generic,
            CtState::Invalid => 0,
        }
    }
}

/// Table configuration.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct CtConfig {
    /// Most connections held; clamped to `1..=ConnTrack::MAX_CAPACITY`.
    pub capacity: usize,
    pub timeouts: CtTimeouts,
    /// Seed of the index hash; choose it at random per node.
    pub hash_seed: u64,
}

impl CtConfig {
    /// Default timeouts, seed 0.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            capacity,
            timeouts: CtTimeouts::default(),
            hash_seed: 0,
        }
    }
}

impl Default for CtConfig {
    /// 65,536 connections.
    fn default() -> Self {
        Self::with_capacity(1 << 16)
    }
}

/// Why an insert failed.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum CtError {
    /// No room: a probe window could not be freed.
    Full,
    /// One of the two keys belongs to a live connection already.
    Exists,
}

/// Names one entry; see the module doc on handles.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct CtHandle {
    idx: u32,
    generation: u32,
}

/// Counters of one table.
#[derive(Clone, Copy, PartialEq, Eq, Default, Debug)]
pub struct CtStats {
    /// Live and not yet removed entries.
    pub entries: u64,
    /// Inserts that returned an error.
    pub insert_failures: u64,
    /// Live entries removed to make room.
    pub evictions: u64,
    /// Expired entries removed (by a sweep, a lookup, or to make room).
    pub expired: u64,
}

/// One connection.
///
/// `repr(C)` keeps what a lookup reads (keys, expiry) in the first cache line of its pool slot.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct CtEntry<V> {
    keys: [FlowKey; 2],
    expires: u64,
    last_seen: u64,
    state: CtState,
    value: V,
    created: u64,
    packets: [u64; 2],
    bytes: [u64; 2],
}

impl<V> CtEntry<V> {
    fn new(orig: FlowKey, reply: FlowKey, value: V, now: u64, timeouts: &CtTimeouts) -> Self {
        let state = match orig.proto {
            proto::TCP => CtState::TcpNone,
            proto::UDP => CtState::UdpUnreplied,
            proto::ICMP => CtState::Icmp,
            _ => CtState::Generic,
        };
        Self {
            keys: [orig, reply],
            value,
            state,
            created: now,
            last_seen: now,
            expires: now.saturating_add(timeouts.of(state)),
            packets: [0; 2],
            bytes: [0; 2],
        }
    }

    pub fn value(&self) -> &V {
        &self.value
    }

    pub fn value_mut(&mut self) -> &mut V {
        &mut self.value
    }

    /// The key of a direction.
    pub fn key(&self, dir: FlowDir) -> &FlowKey {
        &self.keys[dir as usize]
    }

    pub fn state(&self) -> CtState {
        self.state
    }

    /// When the entry was inserted.
    pub fn created(&self) -> u64 {
        self.created
    }

    /// When the last packet was accounted (or the insert, before any).
    pub fn last_seen(&self) -> u64 {
        self.last_seen
    }

    /// The first instant at which the entry is expired.
    pub fn expires(&self) -> u64 {
        self.expires
    }

    pub fn is_expired(&self, now: u64) -> bool {
        now >= self.expires
    }

    /// Whether a packet with these TCP flags (`None`: not TCP) starts a new connection over this
    /// closed one: a SYN without ACK, either way, while the entry is in TIME_WAIT or CLOSE. The
    /// caller ends the entry and treats the packet as new (see the module doc).
    #[inline]
    pub fn is_reopened_by(&self, tcp_flags: Option<u8>) -> bool {
        tcp_flags.is_some_and(is_syn_only)
            && matches!(self.state, CtState::TcpTimeWait | CtState::TcpClose)
    }

    pub fn packets(&self, dir: FlowDir) -> u64 {
        self.packets[dir as usize]
    }

    pub fn bytes(&self, dir: FlowDir) -> u64 {
        self.bytes[dir as usize]
    }

    /// Accounts a packet: counts it, advances the state machine with its TCP flags byte (`None` for
    /// UDP, ICMP and others) and moves the expiry. Returns the new state, the unchanged state when
    /// the packet is ignored, or [`CtState::Invalid`] (entry unchanged but for the counters).
    pub fn on_packet(
        &mut self,
        dir: FlowDir,
        tcp_flags: Option<u8>,
        bytes: u32,
        now: u64,
        timeouts: &CtTimeouts,
    ) -> CtState {
        let d = dir as usize;
        self.packets[d] = self.packets[d].wrapping_add(1);
        self.bytes[d] = self.bytes[d].wrapping_add(u64::from(bytes));
        let next = match self.state {
            CtState::UdpUnreplied | CtState::UdpAssured => match dir {
                FlowDir::Original => self.state,
                FlowDir::Reply => CtState::UdpAssured,
            },
            CtState::Icmp | CtState::Generic | CtState::Invalid => self.state,
            tcp => match tcp_flags {
                None => return CtState::Invalid,
                Some(flags) => match tcp_next(tcp, dir, flags) {
                    TcpNext::To(s) => s,
                    TcpNext::Ignore => return self.state,
                    TcpNext::Invalid => return CtState::Invalid,
                },
            },
        };
        self.state = next;
        self.last_seen = now;
        self.expires = now.saturating_add(timeouts.of(next));
        next
    }
}

enum TcpNext {
    To(CtState),
    Ignore,
    Invalid,
}

/// A SYN without ACK, RST or FIN (ECE, CWR, PSH and URG aside): the packet that opens a connection.
#[inline]
fn is_syn_only(flags: u8) -> bool {
    use tcp_flags::*;
    flags & (SYN | ACK | RST | FIN) == SYN
}

/// Linux's TCP conntrack transition (`tcp_conntracks[dir][flag index][state]`) after its flag
/// validity check (`tcp_valid_flags`, ECE, CWR and PSH masked).
fn tcp_next(state: CtState, dir: FlowDir, flags: u8) -> TcpNext {
    use CtState::*;
    use tcp_flags::*;
    let f = flags & !(ECE | CWR | PSH);
    const VALID: [u8; 9] = [
        SYN,
        SYN | URG,
        SYN | ACK,
        RST,
        RST | ACK,
        FIN | ACK,
        FIN | ACK | URG,
        ACK,
        ACK | URG,
    ];
    if !VALID.contains(&f) {
        return TcpNext::Invalid;
    }
    // Flag index as in Linux's get_conntrack_index: rst, then syn(/ack), then fin, then ack.
    #[derive(Clone, Copy)]
    enum Ev {
        Syn,
        SynAck,
        Fin,
        Ack,
        Rst,
    }
    if matches!(state, TcpTimeWait | TcpClose) && is_syn_only(f) {
        // A new connection over a closed one: not this entry's packet (see the module doc).
        return TcpNext::Invalid;
    }
    let ev = if f & RST != 0 {
        Ev::Rst
    } else if f & SYN != 0 {
        if f & ACK != 0 { Ev::SynAck } else { Ev::Syn }
    } else if f & FIN != 0 {
        Ev::Fin
    } else {
        Ev::Ack
    };
    // Columns: sNO, sSS, sSR, sES, sFW, sCW, sLA, sTW, sCL, sS2.
    let col = match state {
        TcpNone => 0,
        TcpSynSent => 1,
        TcpSynRecv => 2,
        TcpEstablished => 3,
        TcpFinWait => 4,
        TcpCloseWait => 5,
        TcpLastAck => 6,
        TcpTimeWait => 7,
        TcpClose => 8,
        TcpSynSent2 => 9,
        _ => return TcpNext::Invalid,
    };
    // Cells: `None` is Linux's sIV (invalid), `Some(Invalid)` its sIG (ignore), else the next state.
    // The SYN cells of sTW and sCL are never read: such a SYN reopens (returned above); Linux's
    // table has sSS there and its caller kills the entry.
    const IV: Option<CtState> = None;
    const IG: Option<CtState> = Some(Invalid);
    let (ss, sr, es, fw, cw, la, tw, cl, s2) = (
        Some(TcpSynSent),
        Some(TcpSynRecv),
        Some(TcpEstablished),
        Some(TcpFinWait),
        Some(TcpCloseWait),
        Some(TcpLastAck),
        Some(TcpTimeWait),
        Some(TcpClose),
        Some(TcpSynSent2),
    );
    let row: [Option<CtState>; 10] = match (dir, ev) {
        //                                sNO sSS sSR sES sFW sCW sLA sTW sCL sS2
        (FlowDir::Original, Ev::Syn) => [ss, ss, IG, IG, IG, IG, IG, ss, ss, s2],
        (FlowDir::Original, Ev::SynAck) => [IV, IV, sr, IV, IV, IV, IV, IV, IV, sr],
        (FlowDir::Original, Ev::Fin) => [IV, IV, fw, fw, la, la, la, tw, cl, IV],
        (FlowDir::Original, Ev::Ack) => [es, IV, es, es, cw, cw, tw, tw, cl, IV],
        (FlowDir::Original, Ev::Rst) => [IV, cl, cl, cl, cl, cl, cl, cl, cl, cl],
        (FlowDir::Reply, Ev::Syn) => [IV, s2, IV, IV, IV, IV, IV, ss, IV, s2],
        (FlowDir::Reply, Ev::SynAck) => [IV, sr, IG, IG, IG, IG, IG, IG, IG, sr],
        (FlowDir::Reply, Ev::Fin) => [IV, IV, fw, fw, la, la, la, tw, cl, IV],
        (FlowDir::Reply, Ev::Ack) => [IV, IG, sr, es, cw, cw, tw, tw, cl, IG],
        (FlowDir::Reply, Ev::Rst) => [IV, cl, cl, cl, cl, cl, cl, cl, cl, cl],
    };
    match row[col] {
        None => TcpNext::Invalid,
        Some(Invalid) => TcpNext::Ignore,
        Some(s) => TcpNext::To(s),
    }
}

#[derive(Clone, Copy)]
struct IndexSlot {
    /// Low 32 bits of the key's hash; the home slot is `hash & mask`.
    hash: u32,
    /// `pool index << 1 | direction`, or [`EMPTY`].
    entry: u32,
}

const EMPTY: u32 = u32::MAX;
const EMPTY_SLOT: IndexSlot = IndexSlot {
    hash: 0,
    entry: EMPTY,
};

/// Aligned to two cache lines so that an entry never straddles more lines than it needs (the
/// adjacent-line prefetcher fetches the pair).
#[repr(C, align(128))]
struct PoolSlot<V> {
    generation: u32,
    entry: Option<CtEntry<V>>,
}

/// The connection table of one worker.
pub struct ConnTrack<V: Copy> {
    index: Box<[IndexSlot]>,
    mask: usize,
    pool: Box<[PoolSlot<V>]>,
    /// Stack of free pool indices; `free[..free_len]` are free.
    free: Box<[u32]>,
    free_len: usize,
    /// Sweep hand over the pool, for [`ConnTrack::expire`] and eviction.
    hand: usize,
    timeouts: CtTimeouts,
    seed: u64,
    stats: CtStats,
}

impl<V: Copy> std::fmt::Debug for ConnTrack<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnTrack")
            .field("capacity", &self.pool.len())
            .field("index_slots", &self.index.len())
            .field("stats", &self.stats)
            .finish()
    }
}

impl<V: Copy> ConnTrack<V> {
    /// The largest capacity (2^24 connections).
    pub const MAX_CAPACITY: usize = 1 << 24;

    /// Allocates the whole table: the pool of `capacity` entries and the index.
    pub fn new(config: CtConfig) -> Self {
        let capacity = config.capacity.clamp(1, Self::MAX_CAPACITY);
        let index_len = (4 * capacity).next_power_of_two().max(2 * MAX_PROBE);
        let pool: Box<[PoolSlot<V>]> = (0..capacity)
            .map(|_| PoolSlot {
                generation: 0,
                entry: None,
            })
            .collect();
        // Pop order: 0, 1, 2, ...
        let free: Box<[u32]> = (0..capacity as u32).rev().collect();
        Self {
            index: vec![EMPTY_SLOT; index_len].into_boxed_slice(),
            mask: index_len - 1,
            pool,
            free,
            free_len: capacity,
            hand: 0,
            timeouts: config.timeouts,
            seed: config.hash_seed,
            stats: CtStats::default(),
        }
    }

    /// Entries held (expired ones included until removed).
    pub fn len(&self) -> usize {
        self.pool.len() - self.free_len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The fixed capacity.
    pub fn capacity(&self) -> usize {
        self.pool.len()
    }

    pub fn timeouts(&self) -> &CtTimeouts {
        &self.timeouts
    }

    pub fn stats(&self) -> CtStats {
        CtStats {
            entries: self.len() as u64,
            ..self.stats
        }
    }

    /// Bytes held by the table; constant for its lifetime.
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of_val::<[IndexSlot]>(&self.index)
            + std::mem::size_of_val::<[PoolSlot<V>]>(&self.pool)
            + std::mem::size_of_val::<[u32]>(&self.free)
    }

    #[inline]
    fn hash(&self, key: &FlowKey) -> u32 {
        key.hash64_seeded(self.seed) as u32
    }

    /// Finds a key: its index position, pool index and direction.
    #[inline]
    fn find(&self, key: &FlowKey, hash: u32) -> Option<(usize, usize, FlowDir)> {
        let mut pos = hash as usize & self.mask;
        for _ in 0..MAX_PROBE {
            let slot = self.index[pos];
            if slot.entry == EMPTY {
                return None;
            }
            if slot.hash == hash {
                let idx = (slot.entry >> 1) as usize;
                let dir = if slot.entry & 1 == 0 {
                    FlowDir::Original
                } else {
                    FlowDir::Reply
                };
                if let Some(e) = self.pool.get(idx).and_then(|p| p.entry.as_ref())
                    && e.keys[dir as usize] == *key
                {
                    return Some((pos, idx, dir));
                }
            }
            pos = (pos + 1) & self.mask;
        }
        None
    }

    /// Looks a key up. Expired entries are misses (and are removed).
    #[inline]
    pub fn lookup(&mut self, key: &FlowKey, now: u64) -> Option<(CtHandle, FlowDir)> {
        let hash = self.hash(key);
        self.lookup_hashed(key, hash, now)
    }

    #[inline]
    fn lookup_hashed(&mut self, key: &FlowKey, hash: u32, now: u64) -> Option<(CtHandle, FlowDir)> {
        let (_, idx, dir) = self.find(key, hash)?;
        let slot = &self.pool[idx];
        let expired = slot.entry.as_ref().is_none_or(|e| e.is_expired(now));
        if expired {
            self.remove_idx(idx);
            self.stats.expired += 1;
            return None;
        }
        Some((
            CtHandle {
                idx: idx as u32,
                generation: slot.generation,
            },
            dir,
        ))
    }

    /// [`Self::lookup`] for a batch: `out[i]` gets the answer for `keys[i]` (up to the shorter of
    /// the two). Same answers as one `lookup` per key in order, but faster on tables larger than the
    /// caches: it works in groups of [`LOOKUP_GROUP`] keys and first loads every key's home index
    /// slot, then every candidate entry, so that the cache misses of a group overlap instead of
    /// following one another.
    pub fn lookup_batch(
        &mut self,
        keys: &[FlowKey],
        now: u64,
        out: &mut [Option<(CtHandle, FlowDir)>],
    ) {
        let last_pool = self.pool.len() - 1;
        for (keys, out) in keys.chunks(LOOKUP_GROUP).zip(out.chunks_mut(LOOKUP_GROUP)) {
            let mut hashes = [0u32; LOOKUP_GROUP];
            let mut firsts = [EMPTY; LOOKUP_GROUP];
            // Stage 1: independent loads of the home index slot and the next one; keep the entry
            // of the first whose hash matches (most keys sit in one of the two).
            for ((k, h), f) in keys.iter().zip(&mut hashes).zip(&mut firsts) {
                *h = self.hash(k);
                let home = *h as usize & self.mask;
                let a = self.index[home];
                let b = self.index[(home + 1) & self.mask];
                *f = if a.hash == *h { a.entry } else { b.entry };
            }
            // Stage 2: independent loads of the entries those slots name (clamped, branch-free).
            let mut touch = 0u64;
            for f in &firsts {
                let idx = ((f >> 1) as usize).min(last_pool);
                touch ^= self.pool[idx].generation as u64;
            }
            std::hint::black_box(touch);
            // Stage 3: the real lookups, now mostly from cache.
            for ((k, h), o) in keys.iter().zip(&hashes).zip(out.iter_mut()) {
                *o = self.lookup_hashed(k, *h, now);
            }
        }
    }

    /// The entry of a handle; `None` once it has been removed.
    #[inline]
    pub fn get(&self, h: CtHandle) -> Option<&CtEntry<V>> {
        self.pool
            .get(h.idx as usize)
            .filter(|p| p.generation == h.generation)
            .and_then(|p| p.entry.as_ref())
    }

    #[inline]
    pub fn get_mut(&mut self, h: CtHandle) -> Option<&mut CtEntry<V>> {
        self.pool
            .get_mut(h.idx as usize)
            .filter(|p| p.generation == h.generation)
            .and_then(|p| p.entry.as_mut())
    }

    /// [`CtEntry::on_packet`] with this table's timeouts; `None` for a stale handle.
    #[inline]
    pub fn on_packet(
        &mut self,
        h: CtHandle,
        dir: FlowDir,
        tcp_flags: Option<u8>,
        bytes: u32,
        now: u64,
    ) -> Option<CtState> {
        let timeouts = self.timeouts;
        let e = self.get_mut(h)?;
        Some(e.on_packet(dir, tcp_flags, bytes, now, &timeouts))
    }

    /// Removes the entry of a handle (both keys); a stale handle does nothing.
    pub fn remove(&mut self, h: CtHandle) {
        if self.get(h).is_some() {
            self.remove_idx(h.idx as usize);
        }
    }

    /// Inserts a connection under its original and reply keys (the same key twice is indexed once, as
    /// original). Expired entries holding either key are replaced; live ones give
    /// [`CtError::Exists`]. A full pool evicts one entry (see the module doc).
    pub fn insert(
        &mut self,
        orig: FlowKey,
        reply: FlowKey,
        value: V,
        now: u64,
    ) -> Result<CtHandle, CtError> {
        let r = self.try_insert(orig, reply, value, now);
        if r.is_err() {
            self.stats.insert_failures += 1;
        }
        r
    }

    fn try_insert(
        &mut self,
        orig: FlowKey,
        reply: FlowKey,
        value: V,
        now: u64,
    ) -> Result<CtHandle, CtError> {
        let ho = self.hash(&orig);
        let hr = self.hash(&reply);
        for (key, hash) in [(&orig, ho), (&reply, hr)] {
            if let Some((_, idx, _)) = self.find(key, hash) {
                if self.pool[idx]
                    .entry
                    .as_ref()
                    .is_some_and(|e| !e.is_expired(now))
                {
                    return Err(CtError::Exists);
                }
                self.remove_idx(idx);
                self.stats.expired += 1;
            }
        }
        if self.free_len == 0 {
            self.evict_for_pool(ho, now);
        }
        let Some(idx) = self.pop_free() else {
            return Err(CtError::Full);
        };
        let pos_o = match self.reserve(ho, now, usize::MAX) {
            Ok(pos) => pos,
            Err(e) => {
                self.free[self.free_len] = idx as u32;
                self.free_len += 1;
                return Err(e);
            }
        };
        // Occupy the pool slot first so the window evictions below can see it and skip it.
        self.pool[idx].entry = Some(CtEntry::new(orig, reply, value, now, &self.timeouts));
        self.index[pos_o] = IndexSlot {
            hash: ho,
            entry: (idx as u32) << 1,
        };
        if reply != orig {
            match self.reserve(hr, now, idx) {
                Ok(pos_r) => {
                    self.index[pos_r] = IndexSlot {
                        hash: hr,
                        entry: (idx as u32) << 1 | 1,
                    };
                }
                Err(e) => {
                    self.remove_idx(idx);
                    return Err(e);
                }
            }
        }
        Ok(CtHandle {
            idx: idx as u32,
            generation: self.pool[idx].generation,
        })
    }

    /// Removes up to `budget` pool slots' worth of expired entries, continuing where the last sweep
    /// stopped. Returns how many it removed.
    pub fn expire(&mut self, now: u64, budget: usize) -> usize {
        self.expire_each(now, budget, |_| {})
    }

    /// [`ConnTrack::expire`], showing each expired entry to `f` just before removing it.
    pub fn expire_each(
        &mut self,
        now: u64,
        budget: usize,
        mut f: impl FnMut(&CtEntry<V>),
    ) -> usize {
        let n = self.pool.len();
        let mut removed = 0;
        for _ in 0..budget.min(n) {
            let idx = self.hand;
            self.hand = if idx + 1 == n { 0 } else { idx + 1 };
            if let Some(e) = self.pool[idx].entry.as_ref().filter(|e| e.is_expired(now)) {
                f(e);
                self.remove_idx(idx);
                self.stats.expired += 1;
                removed += 1;
            }
        }
        removed
    }

    fn pop_free(&mut self) -> Option<usize> {
        if self.free_len == 0 {
            return None;
        }
        self.free_len -= 1;
        Some(self.free[self.free_len] as usize)
    }

    /// A free index slot within [`MAX_PROBE`] of `hash`'s home, evicting an entry of the window
    /// (never `keep`) if all are taken.
    fn reserve(&mut self, hash: u32, now: u64, keep: usize) -> Result<usize, CtError> {
        for _ in 0..MAX_PROBE {
            let home = hash as usize & self.mask;
            let mut pos = home;
            for _ in 0..MAX_PROBE {
                if self.index[pos].entry == EMPTY {
                    return Ok(pos);
                }
                pos = (pos + 1) & self.mask;
            }
            // The window is full of live keys: evict the best victim of the window and retry
            // (backward shifts may pull a key from past the window into the hole).
            let mut best: Option<usize> = None;
            let mut pos = home;
            for _ in 0..MAX_PROBE {
                let idx = (self.index[pos].entry >> 1) as usize;
                if idx != keep {
                    best = self.better_victim(best, idx, now);
                }
                pos = (pos + 1) & self.mask;
            }
            let victim = best.ok_or(CtError::Full)?;
            self.evict(victim, now);
        }
        Err(CtError::Full)
    }

    /// Frees one pool slot: the best victim among the entries of `hash`'s probe window and the
    /// next [`EVICT_SCAN`] pool slots under the hand.
    fn evict_for_pool(&mut self, hash: u32, now: u64) {
        let mut best = None;
        let mut pos = hash as usize & self.mask;
        for _ in 0..MAX_PROBE {
            let slot = self.index[pos];
            if slot.entry == EMPTY {
                break;
            }
            best = self.better_victim(best, (slot.entry >> 1) as usize, now);
            pos = (pos + 1) & self.mask;
        }
        let n = self.pool.len();
        for _ in 0..EVICT_SCAN.min(n) {
            let idx = self.hand;
            self.hand = if idx + 1 == n { 0 } else { idx + 1 };
            best = self.better_victim(best, idx, now);
        }
        if let Some(victim) = best {
            self.evict(victim, now);
        }
    }

    /// Of two candidates, prefers an expired one, then the older last packet.
    fn better_victim(&self, best: Option<usize>, idx: usize, now: u64) -> Option<usize> {
        let Some(cand) = self.pool.get(idx).and_then(|p| p.entry.as_ref()) else {
            return best;
        };
        let Some(b) = best else {
            return Some(idx);
        };
        let Some(cur) = self.pool[b].entry.as_ref() else {
            return Some(idx);
        };
        let rank = |e: &CtEntry<V>| (!e.is_expired(now), e.last_seen);
        if rank(cand) < rank(cur) {
            Some(idx)
        } else {
            best
        }
    }

    fn evict(&mut self, idx: usize, now: u64) {
        let expired = self.pool[idx]
            .entry
            .as_ref()
            .is_some_and(|e| e.is_expired(now));
        if expired {
            self.stats.expired += 1;
        } else {
            self.stats.evictions += 1;
        }
        self.remove_idx(idx);
    }

    /// Removes the entry in pool slot `idx` and both its index slots.
    fn remove_idx(&mut self, idx: usize) {
        let Some(entry) = self.pool[idx].entry.take() else {
            return;
        };
        for dir in [FlowDir::Original, FlowDir::Reply] {
            let key = entry.keys[dir as usize];
            if dir == FlowDir::Reply && key == entry.keys[0] {
                break;
            }
            let code = (idx as u32) << 1 | dir as u32;
            let mut pos = self.hash(&key) as usize & self.mask;
            for _ in 0..MAX_PROBE {
                if self.index[pos].entry == code {
                    self.delete_at(pos);
                    break;
                }
                pos = (pos + 1) & self.mask;
            }
        }
        let slot = &mut self.pool[idx];
        slot.generation = slot.generation.wrapping_add(1);
        self.free[self.free_len] = idx as u32;
        self.free_len += 1;
    }

    /// Backward-shift deletion: empties `pos` and moves later keys of its cluster back, so that no
    /// key has an empty slot between its home and itself.
    fn delete_at(&mut self, pos: usize) {
        let mask = self.mask;
        let mut hole = pos;
        let mut j = (pos + 1) & mask;
        // The index is at most half full, so the cluster ends.
        while self.index[j].entry != EMPTY {
            let home = self.index[j].hash as usize & mask;
            // Move j into the hole if the hole lies between j's home and j.
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(hole) & mask) {
                self.index[hole] = self.index[j];
                hole = j;
            }
            j = (j + 1) & mask;
        }
        self.index[hole] = EMPTY_SLOT;
    }
}

#[cfg(test)]
mod tests {
    use super::tcp_flags::*;
    use super::*;
    use proptest::prelude::*;

    const S: u64 = NS;

    fn tcp(i: u32) -> FlowKey {
        FlowKey {
            src: 0x0af4_0000 + i,
            dst: 0x0a60_0001,
            src_port: 40000 + (i % 20000) as u16,
            dst_port: 80,
            proto: proto::TCP,
        }
    }

    fn udp(i: u32) -> FlowKey {
        FlowKey {
            proto: proto::UDP,
            ..tcp(i)
        }
    }

    fn table(cap: usize) -> ConnTrack<u32> {
        ConnTrack::new(CtConfig::with_capacity(cap))
    }

    /// Inserts a TCP flow and accounts its SYN.
    fn open(ct: &mut ConnTrack<u32>, k: FlowKey, now: u64) -> CtHandle {
        let h = ct.insert(k, k.reversed(), 7, now).unwrap();
        assert_eq!(
            ct.on_packet(h, FlowDir::Original, Some(SYN), 60, now),
            Some(CtState::TcpSynSent)
        );
        h
    }

    fn step(ct: &mut ConnTrack<u32>, h: CtHandle, dir: FlowDir, flags: u8) -> CtState {
        ct.on_packet(h, dir, Some(flags), 60, 1).unwrap()
    }

    use FlowDir::{Original as O, Reply as R};

    #[test]
    fn flow_key_reverse_and_hash() {
        let k = tcp(1);
        assert_eq!(k.reversed().reversed(), k);
        assert_eq!(k.reversed().src, k.dst);
        assert_eq!(k.reversed().src_port, k.dst_port);
        assert_ne!(k.hash64(), k.reversed().hash64());
        // Golden: the flow hash feeds Maglev and the VXLAN source port on every node.
        let g = FlowKey {
            src: 0x0af4_0105,
            dst: 0x0a60_0001,
            src_port: 43210,
            dst_port: 80,
            proto: 6,
        };
        assert_eq!(g.hash64(), GOLDEN_FLOW_HASH);
        let icmp = FlowKey {
            src: 1,
            dst: 2,
            src_port: 9,
            dst_port: 9,
            proto: proto::ICMP,
        };
        assert_eq!(icmp.reversed().src_port, 9);
    }
    proptest! {
        /// The field-wise hash is XXH3-64 of the key bytes.
        #[test]
        fn hash_is_xxh3(src: u32, dst: u32, sp: u16, dp: u16, p: u8, seed: u64) {
            let k = FlowKey { src, dst, src_port: sp, dst_port: dp, proto: p };
            let b = k.to_bytes();
            prop_assert_eq!(k.hash64_seeded(seed), xxhash_rust::xxh3::xxh3_64_with_seed(&b, seed));
            prop_assert_eq!(k.hash64(), xxhash_rust::xxh3::xxh3_64(&b));
        }
    }

    const GOLDEN_FLOW_HASH: u64 = 8606058817738423228;

    #[test]
    fn tcp_three_way_handshake_and_close() {
        let mut ct = table(16);
        let h = open(&mut ct, tcp(1), 0);
        assert_eq!(step(&mut ct, h, R, SYN | ACK), CtState::TcpSynRecv);
        assert_eq!(step(&mut ct, h, O, ACK), CtState::TcpEstablished);
        assert_eq!(step(&mut ct, h, O, ACK | PSH), CtState::TcpEstablished);
        assert_eq!(step(&mut ct, h, R, ACK), CtState::TcpEstablished);
        assert_eq!(step(&mut ct, h, O, FIN | ACK), CtState::TcpFinWait);
        assert_eq!(step(&mut ct, h, R, ACK), CtState::TcpCloseWait);
        assert_eq!(step(&mut ct, h, R, FIN | ACK), CtState::TcpLastAck);
        assert_eq!(step(&mut ct, h, O, ACK), CtState::TcpTimeWait);
        // A new SYN on the same tuple starts a new connection: not accounted to this one.
        assert!(ct.get(h).unwrap().is_reopened_by(Some(SYN)));
        assert_eq!(step(&mut ct, h, O, SYN), CtState::Invalid);
        assert_eq!(ct.get(h).unwrap().state(), CtState::TcpTimeWait);
    }

    #[test]
    fn syn_over_a_closed_connection_reopens_either_way() {
        for (close, dir) in [
            (&[(O, FIN | ACK), (R, FIN | ACK), (O, ACK)][..], O),
            (&[(O, FIN | ACK), (R, FIN | ACK), (O, ACK)][..], R),
            (&[(R, RST)][..], O),
            (&[(O, RST | ACK)][..], R),
        ] {
            let mut ct = table(16);
            let h = open(&mut ct, tcp(1), 0);
            step(&mut ct, h, R, SYN | ACK);
            step(&mut ct, h, O, ACK);
            for &(d, f) in close {
                step(&mut ct, h, d, f);
            }
            let e = *ct.get(h).unwrap();
            assert!(matches!(
                e.state(),
                CtState::TcpTimeWait | CtState::TcpClose
            ));
            for flags in [SYN, SYN | ECE | CWR, SYN | PSH] {
                assert!(e.is_reopened_by(Some(flags)), "{flags:#x} {dir:?}");
            }
            for flags in [SYN | ACK, ACK, RST, FIN | ACK] {
                assert!(!e.is_reopened_by(Some(flags)), "{flags:#x}");
            }
            assert!(!e.is_reopened_by(None));
            assert_eq!(step(&mut ct, h, dir, SYN), CtState::Invalid);
            assert_eq!(ct.get(h).unwrap().state(), e.state(), "left as it was");
        }
        // Live connections are not reopened: a SYN there is Linux's (ignored or invalid) packet.
        let mut ct = table(16);
        let h = open(&mut ct, tcp(1), 0);
        for (d, f) in [(R, SYN | ACK), (O, ACK), (O, FIN | ACK)] {
            step(&mut ct, h, d, f);
            assert!(!ct.get(h).unwrap().is_reopened_by(Some(SYN)));
        }
    }

    #[test]
    fn tcp_simultaneous_fin() {
        let mut ct = table(16);
        let h = open(&mut ct, tcp(1), 0);
        step(&mut ct, h, R, SYN | ACK);
        step(&mut ct, h, O, ACK);
        assert_eq!(step(&mut ct, h, O, FIN | ACK), CtState::TcpFinWait);
        assert_eq!(step(&mut ct, h, R, FIN | ACK), CtState::TcpLastAck);
        assert_eq!(step(&mut ct, h, O, ACK), CtState::TcpTimeWait);
    }

    #[test]
    fn tcp_reset_closes_from_every_state() {
        for (setup, dir) in [
            (&[][..], O),
            (&[(R, SYN | ACK)][..], R),
            (&[(R, SYN | ACK), (O, ACK)][..], O),
            (&[(R, SYN | ACK), (O, ACK), (O, FIN | ACK)][..], R),
        ] {
            let mut ct = table(16);
            let h = open(&mut ct, tcp(1), 0);
            for &(d, f) in setup {
                step(&mut ct, h, d, f);
            }
            assert_eq!(step(&mut ct, h, dir, RST), CtState::TcpClose);
            assert_eq!(ct.get(h).unwrap().expires(), 1 + 10 * S);
        }
        let mut ct = table(16);
        let h = open(&mut ct, tcp(1), 0);
        assert_eq!(step(&mut ct, h, R, RST | ACK), CtState::TcpClose);
    }

    #[test]
    fn tcp_simultaneous_open() {
        let mut ct = table(16);
        let h = open(&mut ct, tcp(1), 0);
        assert_eq!(step(&mut ct, h, R, SYN), CtState::TcpSynSent2);
        assert_eq!(step(&mut ct, h, R, SYN | ACK), CtState::TcpSynRecv);
    }

    #[test]
    fn tcp_invalid_and_ignored_packets_leave_state() {
        let mut ct = table(16);
        let h = open(&mut ct, tcp(1), 0);
        let before = *ct.get(h).unwrap();
        // SYN/ACK from the client, bad flag combinations, no flags, missing flags byte.
        assert_eq!(step(&mut ct, h, O, SYN | ACK), CtState::Invalid);
        assert_eq!(step(&mut ct, h, O, SYN | FIN), CtState::Invalid);
        assert_eq!(step(&mut ct, h, O, FIN), CtState::Invalid);
        assert_eq!(step(&mut ct, h, O, 0), CtState::Invalid);
        assert_eq!(step(&mut ct, h, O, SYN | RST), CtState::Invalid);
        assert_eq!(
            ct.on_packet(h, O, None, 1, 1),
            Some(CtState::Invalid),
            "a TCP packet must carry flags"
        );
        // ACK from the server before its SYN/ACK is ignored.
        assert_eq!(step(&mut ct, h, R, ACK), CtState::TcpSynSent);
        let after = ct.get(h).unwrap();
        assert_eq!(after.state(), CtState::TcpSynSent);
        assert_eq!(after.expires(), before.expires());
        assert_eq!(
            after.packets(O),
            before.packets(O) + 6,
            "invalid packets still count"
        );
        // Retransmitted SYN/ACK in ESTABLISHED is ignored.
        step(&mut ct, h, R, SYN | ACK);
        step(&mut ct, h, O, ACK);
        assert_eq!(step(&mut ct, h, R, SYN | ACK), CtState::TcpEstablished);
        // ECE/CWR/PSH do not matter.
        assert_eq!(
            step(&mut ct, h, O, ACK | ECE | CWR | PSH),
            CtState::TcpEstablished
        );
    }

    #[test]
    fn tcp_midstream_pickup() {
        let mut ct = table(16);
        let k = tcp(1);
        let h = ct.insert(k, k.reversed(), 0, 0).unwrap();
        assert_eq!(ct.get(h).unwrap().state(), CtState::TcpNone);
        assert_eq!(step(&mut ct, h, O, ACK), CtState::TcpEstablished);
        let h2 = ct.insert(tcp(2), tcp(2).reversed(), 0, 0).unwrap();
        assert_eq!(step(&mut ct, h2, O, FIN | ACK), CtState::Invalid);
        assert_eq!(step(&mut ct, h2, R, ACK), CtState::Invalid);
    }

    #[test]
    fn udp_unreplied_then_assured() {
        let mut ct = table(16);
        let k = udp(1);
        let h = ct.insert(k, k.reversed(), 0, 0).unwrap();
        assert_eq!(ct.get(h).unwrap().state(), CtState::UdpUnreplied);
        assert_eq!(ct.get(h).unwrap().expires(), 30 * S);
        assert_eq!(
            ct.on_packet(h, O, None, 100, 5),
            Some(CtState::UdpUnreplied)
        );
        assert_eq!(ct.get(h).unwrap().expires(), 5 + 30 * S);
        assert_eq!(ct.on_packet(h, R, None, 200, 6), Some(CtState::UdpAssured));
        assert_eq!(ct.get(h).unwrap().expires(), 6 + 120 * S);
        assert_eq!(ct.on_packet(h, O, None, 100, 7), Some(CtState::UdpAssured));
        let e = ct.get(h).unwrap();
        assert_eq!((e.packets(O), e.packets(R)), (2, 1));
        assert_eq!((e.bytes(O), e.bytes(R)), (200, 200));
    }

    #[test]
    fn icmp_and_generic() {
        let mut ct = table(16);
        let k = FlowKey {
            src: 1,
            dst: 2,
            src_port: 77,
            dst_port: 77,
            proto: proto::ICMP,
        };
        let h = ct.insert(k, k.reversed(), 0, 0).unwrap();
        assert_eq!(ct.lookup(&k.reversed(), 1), Some((h, R)));
        assert_eq!(ct.on_packet(h, R, None, 64, 2), Some(CtState::Icmp));
        assert_eq!(ct.get(h).unwrap().expires(), 2 + 30 * S);
        let g = FlowKey {
            proto: 47,
            src_port: 0,
            dst_port: 0,
            ..k
        };
        let h = ct.insert(g, g.reversed(), 0, 0).unwrap();
        assert_eq!(ct.on_packet(h, O, None, 64, 0), Some(CtState::Generic));
        assert_eq!(ct.get(h).unwrap().expires(), 600 * S);
    }

    #[test]
    fn nat_keys_and_duplicates() {
        let mut ct = table(16);
        let client_to_vip = tcp(1);
        let backend_to_client = FlowKey {
            src: 0x0af4_0205,
            src_port: 8080,
            dst: client_to_vip.src,
            dst_port: client_to_vip.src_port,
            proto: proto::TCP,
        };
        let h = ct.insert(client_to_vip, backend_to_client, 42, 0).unwrap();
        assert_eq!(ct.lookup(&client_to_vip, 0), Some((h, O)));
        assert_eq!(ct.lookup(&backend_to_client, 0), Some((h, R)));
        assert_eq!(ct.lookup(&client_to_vip.reversed(), 0), None);
        assert_eq!(*ct.get(h).unwrap().value(), 42);
        assert_eq!(ct.get(h).unwrap().key(R), &backend_to_client);
        assert_eq!(ct.insert(client_to_vip, tcp(9), 1, 0), Err(CtError::Exists));
        assert_eq!(
            ct.insert(tcp(9), backend_to_client, 1, 0),
            Err(CtError::Exists)
        );
        assert_eq!(ct.stats().insert_failures, 2);
        // The same key both ways is indexed once.
        let k = tcp(5);
        let h5 = ct.insert(k, k, 1, 0).unwrap();
        assert_eq!(ct.lookup(&k, 0), Some((h5, O)));
        ct.remove(h5);
        assert_eq!(ct.lookup(&k, 0), None);
        assert_eq!(ct.len(), 1);
    }

    #[test]
    fn stale_handles_do_not_alias() {
        let mut ct = table(1);
        let h1 = ct.insert(udp(1), udp(1).reversed(), 1, 0).unwrap();
        ct.remove(h1);
        let h2 = ct.insert(udp(2), udp(2).reversed(), 2, 0).unwrap();
        assert_eq!(h1.idx, h2.idx, "the slot is reused");
        assert!(ct.get(h1).is_none());
        assert!(ct.get_mut(h1).is_none());
        assert_eq!(ct.on_packet(h1, O, None, 1, 0), None);
        ct.remove(h1);
        assert_eq!(*ct.get(h2).unwrap().value(), 2);
    }

    #[test]
    fn expire_sweeps_with_budget() {
        let mut ct = table(100);
        for i in 0..100 {
            ct.insert(udp(i), udp(i).reversed(), i, u64::from(i) * S)
                .unwrap();
        }
        // At t = 80 s, entries inserted before 50 s are expired (30 s timeout).
        let now = 80 * S;
        assert_eq!(ct.expire(now, 10), 10);
        assert_eq!(ct.len(), 90);
        assert_eq!(
            ct.expire(now, 1000),
            41,
            "51 expired in all; budget caps at one pass"
        );
        assert_eq!(ct.len(), 49);
        assert_eq!(ct.stats().expired, 51);
        assert_eq!(ct.expire(now, 100), 0);
        assert!(ct.lookup(&udp(51), now).is_some());
        assert!(ct.lookup(&udp(50), now).is_none());
    }

    #[test]
    fn lookup_drops_expired_entries() {
        let mut ct = table(4);
        let k = udp(1);
        ct.insert(k, k.reversed(), 0, 0).unwrap();
        assert!(ct.lookup(&k, 30 * S - 1).is_some());
        assert!(ct.lookup(&k.reversed(), 30 * S).is_none());
        assert_eq!(ct.len(), 0);
        // An expired entry's keys can be inserted again.
        let mut ct = table(4);
        ct.insert(k, k.reversed(), 0, 0).unwrap();
        assert!(ct.insert(k, k.reversed(), 1, 30 * S).is_ok());
        assert_eq!(ct.len(), 1);
    }

    #[test]
    fn full_table_evicts_expired_first_then_oldest() {
        let mut ct = table(16);
        // 16 entries: UDP ones expire at 30 s, TCP ones (after a SYN) at 120 s.
        let mut handles = Vec::new();
        for i in 0..16 {
            let k = if i % 4 == 0 { udp(i) } else { tcp(i) };
            let h = ct.insert(k, k.reversed(), i, u64::from(i)).unwrap();
            ct.on_packet(
                h,
                O,
                (k.proto == proto::TCP).then_some(SYN),
                1,
                u64::from(i),
            );
            handles.push((k, h));
        }
        assert_eq!(ct.len(), 16);
        let now = 60 * S;
        for j in 0..4 {
            ct.insert(tcp(100 + j), tcp(100 + j).reversed(), 0, now)
                .unwrap();
            assert_eq!(ct.len(), 16);
        }
        // The four UDP entries (expired) went; every TCP entry survives.
        for (k, h) in &handles {
            assert_eq!(ct.get(*h).is_some(), k.proto == proto::TCP, "{k:?}");
        }
        assert_eq!(ct.stats().evictions, 0);
        assert_eq!(ct.stats().expired, 4);
        // No expired entry left: the oldest live one goes (tcp(1), last packet at t = 1).
        ct.insert(tcp(200), tcp(200).reversed(), 0, now).unwrap();
        assert!(ct.get(handles[1].1).is_none());
        assert!(ct.get(handles[2].1).is_some());
        assert_eq!(ct.stats().evictions, 1);
        assert_eq!(ct.len(), 16);
    }

    #[test]
    fn pool_slot_is_two_cache_lines() {
        assert_eq!(std::mem::size_of::<PoolSlot<u32>>(), 128);
        assert_eq!(std::mem::size_of::<PoolSlot<[u64; 3]>>(), 128);
        assert_eq!(std::mem::align_of::<PoolSlot<u32>>(), 128);
        assert_eq!(std::mem::size_of::<IndexSlot>(), 8);
        let ct = table(1 << 10);
        assert_eq!(ct.memory_bytes(), (1 << 10) * (128 + 4) + (1 << 12) * 8);
    }

    #[test]
    fn capacity_one_and_clamping() {
        let mut ct = table(0);
        assert_eq!(ct.capacity(), 1);
        ct.insert(udp(1), udp(1).reversed(), 0, 0).unwrap();
        ct.insert(udp(2), udp(2).reversed(), 0, 0).unwrap();
        assert_eq!(ct.len(), 1);
        assert!(ct.lookup(&udp(2), 0).is_some());
        assert!(ct.lookup(&udp(1), 0).is_none());
    }

    #[test]
    fn batch_lookup_matches_single() {
        let mut ct = table(300);
        for i in 0..300 {
            let k = if i % 3 == 0 { udp(i) } else { tcp(i) };
            ct.insert(k, k.reversed(), i, u64::from(i) * S).unwrap();
        }
        // Hits both ways, misses, and expired entries (UDP ones inserted before 50 s).
        let keys: Vec<FlowKey> = (0..350)
            .flat_map(|i| {
                let k = if i % 3 == 0 { udp(i) } else { tcp(i) };
                [k, k.reversed()]
            })
            .collect();
        let now = 80 * S;
        let mut single = table(300);
        for i in 0..300 {
            let k = if i % 3 == 0 { udp(i) } else { tcp(i) };
            single.insert(k, k.reversed(), i, u64::from(i) * S).unwrap();
        }
        let want: Vec<_> = keys.iter().map(|k| single.lookup(k, now)).collect();
        let mut got = vec![None; keys.len() + 5];
        ct.lookup_batch(&keys, now, &mut got);
        assert_eq!(&got[..keys.len()], &want[..]);
        assert!(got[keys.len()..].iter().all(Option::is_none));
        assert_eq!(ct.len(), single.len());
        assert!(want.iter().filter(|w| w.is_some()).count() > 300);
        assert!(want.iter().filter(|w| w.is_none()).count() > 100);
        // A short output slice answers only its prefix.
        let mut short = [None; 3];
        ct.lookup_batch(&keys[2..], now, &mut short);
        assert_eq!(&short[..], &want[2..5]);
    }

    #[derive(Clone, Copy, Debug)]
    enum Op {
        Insert(u16),
        Lookup(u16),
        Remove(u16),
        Expire(u8),
        Tick(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u16..400).prop_map(Op::Insert),
            3 => (0u16..400).prop_map(Op::Lookup),
            1 => (0u16..400).prop_map(Op::Remove),
            1 => any::<u8>().prop_map(Op::Expire),
            1 => any::<u8>().prop_map(Op::Tick),
        ]
    }

    fn reply_of(i: u16) -> FlowKey {
        // A NAT-style reply key, unrelated to the reversed original.
        FlowKey {
            src: 0x0a00_0000 + u32::from(i),
            dst: 0x0b00_0000,
            src_port: i,
            dst_port: 53,
            proto: proto::UDP,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Model check against a HashMap: every live entry is found under both keys with the
        /// right direction; capacity is never exceeded; memory never changes.
        #[test]
        fn model(cap in 1usize..64, ops in proptest::collection::vec(op(), 1..400)) {
            let mut ct = table(cap);
            let mem = ct.memory_bytes();
            let mut model: std::collections::HashMap<u16, (CtHandle, u64)> = Default::default();
            let mut now = 0u64;
            for op in ops {
                match op {
                    Op::Insert(i) => {
                        let k = udp(u32::from(i));
                        let live = model.get(&i).is_some_and(|&(_, exp)| now < exp);
                        let r = ct.insert(k, reply_of(i), u32::from(i), now);
                        if live {
                            prop_assert_eq!(r, Err(CtError::Exists));
                        } else {
                            let h = r.unwrap();
                            model.insert(i, (h, now + 30 * S));
                        }
                    }
                    Op::Lookup(i) => {
                        let got = ct.lookup(&udp(u32::from(i)), now);
                        let got_r = ct.lookup(&reply_of(i), now);
                        match model.get(&i) {
                            Some(&(h, exp)) if now < exp && ct.get(h).is_some() => {
                                prop_assert_eq!(got, Some((h, FlowDir::Original)));
                                prop_assert_eq!(got_r, Some((h, FlowDir::Reply)));
                                prop_assert_eq!(*ct.get(h).unwrap().value(), u32::from(i));
                            }
                            _ => {
                                prop_assert_eq!(got, None);
                                prop_assert_eq!(got_r, None);
                            }
                        }
                    }
                    Op::Remove(i) => {
                        if let Some((h, _)) = model.remove(&i) {
                            ct.remove(h);
                            prop_assert!(ct.get(h).is_none());
                        }
                    }
                    Op::Expire(b) => { ct.expire(now, usize::from(b)); }
                    Op::Tick(t) => now += u64::from(t) * S / 4,
                }
                // Entries evicted to make room are gone from the table; forget them.
                model.retain(|_, (h, _)| ct.get(*h).is_some());
                prop_assert!(ct.len() <= cap);
                prop_assert!(model.len() <= ct.len());
                prop_assert_eq!(ct.memory_bytes(), mem);
            }
        }

        /// Expiry happens exactly at `last packet + timeout(state)`.
        #[test]
        fn expiry_boundary(kind in 0usize..7, t0 in 0u64..1_000_000_000_000) {
            let mut ct = table(8);
            let k = if kind < 5 { tcp(1) } else { udp(1) };
            let h = ct.insert(k, k.reversed(), 0, 0).unwrap();
            let script: &[(FlowDir, u8)] = match kind {
                0 => &[(O, SYN)],
                1 => &[(O, SYN), (R, SYN | ACK)],
                2 => &[(O, SYN), (R, SYN | ACK), (O, ACK)],
                3 => &[(O, SYN), (R, SYN | ACK), (O, ACK), (O, FIN | ACK), (R, ACK)],
                4 => &[(O, SYN), (R, RST)],
                5 => &[(O, 0)],
                _ => &[(O, 0), (R, 0)],
            };
            let mut state = CtState::Invalid;
            for &(d, f) in script {
                let flags = (k.proto == proto::TCP).then_some(f);
                state = ct.on_packet(h, d, flags, 1, t0).unwrap();
            }
            let timeout = CtTimeouts::default().of(state);
            let want = [120, 60, 432_000, 60, 10, 30, 120][kind] * S;
            prop_assert_eq!(timeout, want);
            prop_assert!(ct.lookup(&k, t0 + timeout - 1).is_some());
            prop_assert!(ct.lookup(&k.reversed(), t0 + timeout - 1).is_some());
            prop_assert!(ct.lookup(&k, t0 + timeout).is_none());
            prop_assert_eq!(ct.len(), 0);
        }

        /// A full table with any expired entry evicts an expired one, never a live one (for tables
        /// of at most EVICT_SCAN entries the sweep sees them all; larger ones look at a window).
        #[test]
        fn full_table_evicts_expired_first(
            ages in proptest::collection::vec(0u64..60, 1..=EVICT_SCAN),
            extra in 1usize..8,
        ) {
            let cap = ages.len();
            let mut ct = table(cap);
            let now = 60 * S;
            let mut handles = Vec::new();
            for (i, &age) in ages.iter().enumerate() {
                let k = udp(i as u32);
                // Inserted `age` seconds ago: expired iff age >= 30.
                let h = ct.insert(k, k.reversed(), 0, now - age * S).unwrap();
                handles.push((h, age >= 30));
            }
            let expired = handles.iter().filter(|(_, e)| *e).count();
            for j in 1..=extra {
                let k = tcp(1000 + j as u32);
                ct.insert(k, k.reversed(), 0, now).unwrap();
                prop_assert_eq!(ct.len(), cap);
                // The first `expired` inserts take expired entries; only later ones evict.
                prop_assert_eq!(ct.stats().evictions as usize, j.saturating_sub(expired));
                if j <= expired {
                    prop_assert!(handles.iter().all(|(h, e)| *e || ct.get(*h).is_some()));
                }
            }
            prop_assert_eq!(ct.stats().expired as usize, expired.min(extra));
        }

        /// Filling far past capacity with distinct flows keeps the table at capacity, finds the
        /// newest flow, and never fails an insert.
        #[test]
        fn churn_never_exceeds_capacity(cap in 1usize..300, n in 1u32..2000, seed in any::<u64>()) {
            let mut ct: ConnTrack<u32> = ConnTrack::new(CtConfig { hash_seed: seed, ..CtConfig::with_capacity(cap) });
            let mem = ct.memory_bytes();
            for i in 0..n {
                let k = tcp(i);
                let h = ct.insert(k, k.reversed(), i, u64::from(i)).unwrap();
                prop_assert_eq!(ct.lookup(&k, u64::from(i)), Some((h, O)));
                prop_assert!(ct.len() <= cap);
            }
            prop_assert_eq!(ct.len(), cap.min(n as usize));
            prop_assert_eq!(ct.stats().insert_failures, 0);
            prop_assert_eq!(ct.stats().evictions, u64::from(n).saturating_sub(cap as u64));
            prop_assert_eq!(ct.memory_bytes(), mem);
        }
    }
}
