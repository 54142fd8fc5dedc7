//! GRO for TCP over one receive batch: in-order segments of a flow become one large frame for the
//! pod (DESIGN, "MTU strategy"), planned without copying payload.
//!
//! Owns: the decision which frames of a batch merge ([`coalesce`]), the rewrite of the merged
//! frame's headers in its first frame's head, and the plan ([`Merged`]) that tells the worker which
//! byte ranges of which buffers follow that head as continuation descriptors of one AF_XDP
//! multi-buffer frame.
//!
//! # What merges
//! A frame joins the open merge of its flow when, as Linux's `tcp_gro_receive` asks:
//! - it is Ethernet + IPv4 without options, not a fragment, TCP, its length consistent with its
//!   buffers (a chained frame ends exactly at its IP total length), with payload;
//! - same addresses and ports; its sequence number is where the merge's payload ends; same ACK
//!   number; same IP TOS, TTL and DF; identical TCP options (same length, same bytes); the same
//!   flags but PSH (ACK and ECE equal), and none of SYN, FIN, RST, URG, CWR (a merge's first
//!   segment may carry CWR);
//! - at most as much payload as the merge's first segment (its MSS);
//! - its checksum is of the same kind as the merge's (both complete, or both partial);
//! - the merge stays within [`MAX_IP_LEN`] bytes of IP packet and [`MAX_BUFFERS`] buffers.
//!
//! A segment with PSH, or with less payload than the first, joins and then closes the merge. A
//! frame of the flow that cannot join closes the flow's merge and goes on alone (or starts the
//! next merge): per flow, the order of frames never changes; frames of different flows may be
//! reordered against each other, as GRO does. At most 8 merges are open at once (the oldest is
//! closed to make room); all are closed at the end of the batch. Frames that are not TCP pass
//! unchanged, each its own entry. A frame whose flow cannot be told (headers continuing past its
//! first buffer, a fragment, a malformed IPv4 header) passes alone and closes every open merge, so
//! that no flow's later segments overtake it.
//!
//! The merged frame keeps its first segment's headers, with: IP total length (the IP checksum
//! updated incrementally, so a bad one stays bad); PSH if a member had it; the newest member's
//! window (Linux keeps the first's; the newest is the receiver-side truth); and the TCP checksum
//! of the merged packet.
//!
//! # Checksums: what is trusted
//! The merged TCP checksum is computed in O(1) per segment, never by summing payload: from each
//! segment's own checksum field C, pseudo-header P and header H (checksum field zero), its payload
//! sums to D = ~C + ~P + ~H in ones'-complement arithmetic; each D is byte-swapped when its
//! payload lands at an odd offset of the merged payload; the merged field is
//! ~(P' + H' + sum of D). Consequences, by [`ChecksumTrust`]:
//! - [`ChecksumTrust::Derive`] (the fast path): a segment whose checksum was wrong carries its
//!   error into the merged checksum, so the merged packet fails verification at the pod (which
//!   drops it; TCP retransmits every segment in it). A corrupt segment is therefore never merged
//!   silently into a packet that verifies, except when two or more corruptions in one merge cancel
//!   out, with probability 2^-16: the same odds by which TCP's own checksum misses one random
//!   corruption. The kernel's GRO instead verifies each segment first (by hardware, or by summing);
//!   use the next mode where that is wanted.
//! - [`ChecksumTrust::Verify`] (the kernel's rule): each segment's payload is summed
//!   ([`WordSum`], about 0.1 ns a byte) and only segments whose checksum verifies merge; one that
//!   does not passes alone, so the pod's own check drops it and counts it.
//!
//! Partial checksums (CHECKSUM_PARTIAL, the field holding the folded pseudo-header sum, as frames
//! from a kernel node over veth carry) hold no payload sum: partial segments merge only with
//! partial ones, and the merged field is the partial sum for the merged length, completed later
//! as any partial frame is (`nat::complete_partial_checksum`, or TX checksum metadata). There is
//! nothing in them to verify.
//!
//! Must not: allocate, copy payload, or panic on any input (the fuzz target `coalesce`).
//!
//! # How a worker drives it
//! On the frames of a receive batch that go to local pods (after the pipeline: decap, conntrack
//! and reverse NAT are per segment; or before it, on decapsulated frames, so the pipeline runs
//! once per merged frame):
//! ```text
//! let n = coalesce::coalesce(&mut frames, ChecksumTrust::Derive, &mut plan); // plan: [Merged; BATCH]
//! for m in &plan[..n] {
//!     let f = &frames[m.first()];         // its head was rewritten for the merged packet
//!     tx.push(desc(f.offset(), f.len())); // then the first frame's own tail descriptors,
//!     for t in f's tail { tx.push(t) }    // then each piece as a continuation descriptor:
//!     for p in m.pieces() { tx.push(desc(chunk_of(p.frame, p.buf) + p.off, p.len)) }
//! }
//! ```
//! `Piece::buf` 0 is a frame's first buffer, its `off` counted from the packet's start in it
//! (`Frame::offset`); `buf` n is the frame's tail buffer n - 1. Every chunk of the batch is sent
//! exactly once: the frames whose payload became pieces are not sent on their own.

use crate::checksum;
use crate::flow::proto;
use crate::frame::Frame;
use crate::wire::ipv4::field as ipf;
use crate::wire::tcp::field as tf;
use crate::wire::{be16, be32, ethernet, ipv4, put16, tcp};
use crate::wordsum::WordSum;

/// At most this many buffers make one AF_XDP multi-buffer frame (`XDP_USE_SG`: the first
/// chunk and 17 more).
pub const MAX_BUFFERS: usize = 18;
/// Continuation pieces of one merged frame at most.
pub const MAX_PIECES: usize = MAX_BUFFERS - 1;
/// The largest IP packet a merge may make.
pub const MAX_IP_LEN: usize = 65_535;
/// Merges open at once.
const OPEN: usize = 8;

const L3: usize = ethernet::HEADER_LEN;
/// Offset of the EtherType (the last field of the Ethernet header).
const ETHERTYPE: usize = L3 - 2;
const L4: usize = L3 + ipv4::MIN_HEADER_LEN;
/// Flags that keep a segment out of any merge.
const NEVER: u8 = tcp::flags::SYN | tcp::flags::FIN | tcp::flags::RST | tcp::flags::URG;

/// What the coalescer trusts about a segment's complete checksum (see the module doc).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ChecksumTrust {
    /// Derive payload sums from the checksum fields, O(1) per segment; a wrong checksum makes
    /// the merged one wrong.
    #[default]
    Derive,
    /// Sum each segment's payload; merge only segments whose checksum verifies.
    Verify,
}

/// A byte range of one buffer of one frame of the batch: a continuation buffer of a merged frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Piece {
    /// The frame's index in the batch.
    pub frame: u16,
    /// 0: the frame's first buffer (its `head()`); n: its tail buffer n - 1.
    pub buf: u8,
    /// Offset in that buffer's packet bytes (for `buf` 0, from `Frame::offset`).
    pub off: u32,
    /// Bytes.
    pub len: u32,
}

/// One frame to send: a batch frame as it is, or a merge of several (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Merged {
    first: u16,
    segments: u16,
    npieces: u8,
    pieces: [Piece; MAX_PIECES],
}

impl Default for Merged {
    fn default() -> Self {
        Self {
            first: 0,
            segments: 1,
            npieces: 0,
            pieces: [Piece::default(); MAX_PIECES],
        }
    }
}

impl Merged {
    /// The index of the frame whose buffers (head, rewritten, then its own tail) come first.
    pub fn first(&self) -> usize {
        usize::from(self.first)
    }

    /// Segments merged into this frame (1: the frame goes as it was).
    pub fn segments(&self) -> usize {
        usize::from(self.segments)
    }

    /// Whether several segments were merged.
    pub fn is_merge(&self) -> bool {
        self.segments > 1
    }

    /// The continuation buffers after the first frame's own, in order.
    pub fn pieces(&self) -> &[Piece] {
        &self.pieces[..usize::from(self.npieces)]
    }

    fn start(&mut self, frame: usize) {
        self.first = frame as u16;
        self.segments = 1;
        self.npieces = 0;
    }

    fn push(&mut self, p: Piece) {
        if let Some(slot) = self.pieces.get_mut(usize::from(self.npieces)) {
            *slot = p;
            self.npieces += 1;
        }
    }
}

/// A TCP flow's identity: addresses and ports.
type Key = u128;

/// What a frame is to the coalescer.
#[derive(Clone, Copy, Debug)]
struct Segment {
    key: Key,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    /// TOS, TTL and DF, which must match.
    ip_match: [u8; 3],
    tcp_hl: usize,
    ip_len: usize,
    payload: usize,
    partial: bool,
    /// Sum of the fixed 20-byte TCP header, checksum field included.
    hdr_sum: u64,
    /// Buffers its payload spans as a later member.
    bufs: usize,
}

/// What a frame is to the coalescer.
enum Seen {
    /// Readable and not TCP over IPv4: no flow's business.
    NotTcp,
    /// Possibly TCP of any flow, but its flow cannot be told (headers beyond the first buffer, a
    /// fragment, a malformed header): it closes every open merge, so no flow is reordered past it.
    Unknown,
    /// TCP of flow `Key`; the segment if it may take part in a merge at all.
    Tcp(Key, Option<Segment>),
}

/// Read a frame's Ethernet, IPv4 and TCP headers.
fn inspect(f: &Frame<'_>) -> Seen {
    let h = f.head();
    let Some(ip) = h.get(L3..L3 + ipv4::MIN_HEADER_LEN) else {
        return match h.get(ETHERTYPE..L3) {
            Some(t) if t != ethernet::ethertype::IPV4.to_be_bytes() => Seen::NotTcp,
            _ => Seen::Unknown,
        };
    };
    if be16(h, ETHERTYPE) != ethernet::ethertype::IPV4 {
        return Seen::NotTcp;
    }
    let ip_hl = usize::from(ip[ipf::VER_IHL] & 0x0f) * 4;
    if ip[ipf::VER_IHL] >> 4 != 4 || ip_hl < ipv4::MIN_HEADER_LEN {
        return Seen::Unknown;
    }
    if ip[ipf::PROTOCOL] != proto::TCP {
        return Seen::NotTcp;
    }
    let Some(ports) = h.get(L3 + ip_hl..L3 + ip_hl + 4) else {
        return Seen::Unknown;
    };
    if be16(ip, ipf::FLAGS_FRAG) & !ipv4::FLAG_DF != 0 {
        return Seen::Unknown;
    }
    let w = |b: &[u8], at: usize| u128::from(be32(b, at));
    let key = w(ip, ipf::SRC.start) << 64 | w(ip, ipf::DST.start) << 32 | w(ports, 0);
    Seen::Tcp(key, segment(f, key, ip_hl))
}

/// The segment of TCP frame `f` of flow `key` if it may take part in a merge at all.
fn segment(f: &Frame<'_>, key: Key, ip_hl: usize) -> Option<Segment> {
    let h = f.head();
    if ip_hl != ipv4::MIN_HEADER_LEN || h.len() < L4 + tcp::MIN_HEADER_LEN {
        return None;
    }
    let ip_len = usize::from(be16(h, L3 + ipf::TOTAL_LEN));
    let tcp_hl = usize::from(h[L4 + tf::DATA_OFF] >> 4) * 4;
    let total = f.total_len();
    let fits = if f.is_chained() {
        L3 + ip_len == total
    } else {
        L3 + ip_len <= total
    };
    if !fits || tcp_hl < tcp::MIN_HEADER_LEN || L4 + tcp_hl > h.len() || 20 + tcp_hl >= ip_len {
        return None;
    }
    let t = &h[L4..];
    let be32 = |at: usize| u32::from_be_bytes([t[at], t[at + 1], t[at + 2], t[at + 3]]);
    let payload = ip_len - 20 - tcp_hl;
    let csum = be16(t, tf::CHECKSUM);
    let partial =
        csum == checksum::pseudo_header_folded(src(h), dst(h), proto::TCP, (ip_len - 20) as u16);
    let head_payload = h.len().min(L3 + ip_len) - (L4 + tcp_hl);
    let bufs = usize::from(head_payload > 0) + f.tail().iter().filter(|b| !b.is_empty()).count();
    Some(Segment {
        key,
        seq: be32(4),
        ack: be32(8),
        flags: t[tf::FLAGS],
        window: be16(t, tf::WINDOW),
        ip_match: [
            h[L3 + ipf::TOS],
            h[L3 + ipf::TTL],
            u8::from(be16(h, L3 + ipf::FLAGS_FRAG) & ipv4::FLAG_DF != 0),
        ],
        tcp_hl,
        ip_len,
        payload,
        partial,
        hdr_sum: words_sum(&t[..tcp::MIN_HEADER_LEN]),
        bufs,
    })
}

/// The IPv4 address at `at` in `b`.
fn addr(b: &[u8], at: usize) -> [u8; 4] {
    be32(b, at).to_be_bytes()
}

fn src(h: &[u8]) -> [u8; 4] {
    addr(h, L3 + ipf::SRC.start)
}

fn dst(h: &[u8]) -> [u8; 4] {
    addr(h, L3 + ipf::DST.start)
}

/// Fold a sum to 16 bits (any `u64`: four steps suffice).
fn fold(s: u64) -> u16 {
    let s = (s & 0xffff_ffff) + (s >> 32);
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    ((s & 0xffff) + (s >> 16)) as u16
}

/// The sum of the 16-bit words of `b` (a multiple of 4 bytes long), read 32 bits at a time.
fn words_sum(b: &[u8]) -> u64 {
    b.chunks_exact(4)
        .map(|w| {
            let w = u32::from_be_bytes([w[0], w[1], w[2], w[3]]);
            u64::from(w >> 16) + u64::from(w & 0xffff)
        })
        .sum()
}

/// Whether two TCP option blocks (multiples of 4 bytes) are the same, compared in words.
fn same_options(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len()
        && a.chunks_exact(4)
            .zip(b.chunks_exact(4))
            .all(|(x, y)| x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3])
}

/// The pseudo-header's sum without its length, plus the options' sum: what every member of a
/// merge shares.
fn shared_sum(h: &[u8], tcp_hl: usize) -> u64 {
    u64::from(checksum::pseudo_header_sum(src(h), dst(h), proto::TCP, 0))
        + words_sum(&h[L4 + tcp::MIN_HEADER_LEN..L4 + tcp_hl])
}

/// The folded payload sum that segment `s`'s complete checksum implies: the checksum verifies
/// when pseudo-header, header (checksum field included) and payload sum to zero, so the payload
/// sums to the complement of the rest. `shared` is [`shared_sum`].
fn derived_payload_sum(s: &Segment, shared: u64) -> u16 {
    !fold(shared + (s.ip_len - ipv4::MIN_HEADER_LEN) as u64 + s.hdr_sum)
}

/// The payload sum of segment `s` of frame `f`, summed.
fn summed_payload(f: &Frame<'_>, s: &Segment) -> u16 {
    let mut sum = WordSum::new();
    let mut left = s.payload;
    for c in f.chunks_from(L4 + s.tcp_hl) {
        let c = &c[..c.len().min(left)];
        sum.add(c);
        left -= c.len();
    }
    sum.fold()
}

/// Whether two folded ones'-complement values are the same number (0 and 0xffff both are zero).
fn same_sum(a: u16, b: u16) -> bool {
    a == b || (a | b == 0xffff && (a == 0 || b == 0))
}

/// A merge being built.
#[derive(Clone, Copy, Debug)]
struct Open {
    /// Its entry in the plan.
    entry: usize,
    key: Key,
    first: usize,
    first_flags: u8,
    next_seq: u32,
    ack: u32,
    ip_match: [u8; 3],
    tcp_hl: usize,
    /// Payload of the first segment: the most any later one may carry.
    mss: usize,
    /// IP length of the first segment, and of the merge so far.
    first_ip_len: usize,
    ip_len: usize,
    bufs: usize,
    partial: bool,
    /// [`shared_sum`] of the members.
    shared: u64,
    /// Sum of the members' payload sums, each swapped into place.
    payload_sum: u64,
    payload: usize,
    psh: bool,
    window: u16,
}

/// Plan the batch `frames` into `out` (see the module doc); returns how many entries of `out`
/// hold the plan. Each frame is in exactly one entry, as its first frame or as pieces. Only the
/// first `out.len()` frames (and at most 65,535) are planned: give `out` one entry per frame.
pub fn coalesce(frames: &mut [Frame<'_>], trust: ChecksumTrust, out: &mut [Merged]) -> usize {
    let n = frames.len().min(out.len()).min(usize::from(u16::MAX));
    let mut open: [Option<Open>; OPEN] = [None; OPEN];
    let mut entries = 0;
    for i in 0..n {
        let (key, seg) = match inspect(&frames[i]) {
            Seen::NotTcp => (None, None),
            Seen::Unknown => {
                open.iter_mut().for_each(|o| close(o, frames, out));
                (None, None)
            }
            Seen::Tcp(k, s) => (Some(k), s.and_then(|s| checked(&frames[i], s, trust))),
        };
        let slot = key.and_then(|k| open.iter().position(|o| o.is_some_and(|o| o.key == k)));
        if let (Some(j), Some(s)) = (slot, seg)
            && let Some(o) = open[j].as_mut()
            && joins(o, frames, i, &s)
        {
            let ends = join(o, &mut out[o.entry], &frames[i], i, &s);
            if ends {
                close(&mut open[j], frames, out);
            }
            continue;
        }
        if let Some(j) = slot {
            close(&mut open[j], frames, out);
        }
        out[entries].start(i);
        if let Some(s) = seg
            && s.flags & NEVER == 0
            && s.flags & tcp::flags::PSH == 0
            && 1 + frames[i].tail().len() < MAX_BUFFERS
        {
            let j = match open.iter().position(Option::is_none) {
                Some(j) => j,
                None => {
                    let oldest = (0..OPEN)
                        .min_by_key(|&j| open[j].map_or(usize::MAX, |o| o.entry))
                        .unwrap_or(0);
                    close(&mut open[oldest], frames, out);
                    oldest
                }
            };
            open[j] = Some(begin(&frames[i], i, entries, &s));
        }
        entries += 1;
    }
    for o in open.iter_mut() {
        close(o, frames, out);
    }
    entries
}

/// The segment if its checksum is acceptable under `trust` (partial ones always are).
fn checked(f: &Frame<'_>, s: Segment, trust: ChecksumTrust) -> Option<Segment> {
    if trust == ChecksumTrust::Derive || s.partial {
        return Some(s);
    }
    let shared = shared_sum(f.head(), s.tcp_hl);
    same_sum(derived_payload_sum(&s, shared), summed_payload(f, &s)).then_some(s)
}

fn begin(f: &Frame<'_>, i: usize, entry: usize, s: &Segment) -> Open {
    let shared = shared_sum(f.head(), s.tcp_hl);
    let payload_sum = if s.partial {
        0
    } else {
        u64::from(derived_payload_sum(s, shared))
    };
    Open {
        entry,
        key: s.key,
        first: i,
        first_flags: s.flags,
        next_seq: s.seq.wrapping_add(s.payload as u32),
        ack: s.ack,
        ip_match: s.ip_match,
        tcp_hl: s.tcp_hl,
        mss: s.payload,
        first_ip_len: s.ip_len,
        ip_len: s.ip_len,
        bufs: 1 + f.tail().len(),
        partial: s.partial,
        shared,
        payload_sum,
        payload: s.payload,
        psh: false,
        window: s.window,
    }
}

/// Whether segment `s` (frame `i`) may join merge `o`.
fn joins(o: &Open, frames: &[Frame<'_>], i: usize, s: &Segment) -> bool {
    s.flags & (NEVER | tcp::flags::CWR) == 0
        && (s.flags ^ o.first_flags) & !(tcp::flags::PSH | tcp::flags::CWR) == 0
        && s.seq == o.next_seq
        && s.ack == o.ack
        && s.ip_match == o.ip_match
        && s.tcp_hl == o.tcp_hl
        && s.payload <= o.mss
        && s.partial == o.partial
        && o.ip_len + s.payload <= MAX_IP_LEN
        && o.bufs + s.bufs <= MAX_BUFFERS
        && same_options(
            &frames[i].head()[L4 + tcp::MIN_HEADER_LEN..L4 + s.tcp_hl],
            &frames[o.first].head()[L4 + tcp::MIN_HEADER_LEN..L4 + o.tcp_hl],
        )
}

/// Add segment `s` (frame `f`, index `i`) to merge `o` and its entry; returns whether the merge
/// ends with it.
fn join(o: &mut Open, e: &mut Merged, f: &Frame<'_>, i: usize, s: &Segment) -> bool {
    let h = f.head();
    let at = L4 + s.tcp_hl;
    let in_head = h.len().min(L3 + s.ip_len) - at;
    if in_head > 0 {
        e.push(Piece {
            frame: i as u16,
            buf: 0,
            off: at as u32,
            len: in_head as u32,
        });
    }
    for (b, t) in f.tail().iter().enumerate() {
        if !t.is_empty() {
            e.push(Piece {
                frame: i as u16,
                buf: (b + 1) as u8,
                off: 0,
                len: t.len() as u32,
            });
        }
    }
    e.segments += 1;
    if !o.partial {
        let d = derived_payload_sum(s, o.shared);
        // Payload landing at an odd offset of the merged payload is summed byte-swapped.
        let d = if o.payload % 2 == 1 {
            d.swap_bytes()
        } else {
            d
        };
        o.payload_sum += u64::from(d);
    }
    o.payload += s.payload;
    o.ip_len += s.payload;
    o.bufs += s.bufs;
    o.next_seq = o.next_seq.wrapping_add(s.payload as u32);
    o.window = s.window;
    o.psh |= s.flags & tcp::flags::PSH != 0;
    o.psh || s.payload < o.mss
}

/// Close the merge in `slot`, if any: rewrite its first frame's headers for the merged packet.
fn close(slot: &mut Option<Open>, frames: &mut [Frame<'_>], out: &[Merged]) {
    let Some(o) = slot.take() else {
        return;
    };
    if !out[o.entry].is_merge() {
        return;
    }
    let f = &mut frames[o.first];
    if !f.is_chained() {
        // Ethernet padding must not sit between the first payload and the pieces.
        f.truncate_head(L3 + o.first_ip_len);
    }
    let h = f.head_mut();
    let (ip, t) = h[L3..].split_at_mut(ipv4::MIN_HEADER_LEN);
    let ip_len = o.ip_len as u16;
    let ip_csum = checksum::update16(be16(ip, ipf::CHECKSUM), be16(ip, ipf::TOTAL_LEN), ip_len);
    put16(ip, ipf::TOTAL_LEN, ip_len);
    put16(ip, ipf::CHECKSUM, ip_csum);
    if o.psh {
        t[tf::FLAGS] |= tcp::flags::PSH;
    }
    put16(t, tf::WINDOW, o.window);
    let tcp_len = (o.ip_len - ipv4::MIN_HEADER_LEN) as u64;
    put16(t, tf::CHECKSUM, 0);
    let c = if o.partial {
        let (s, d) = (addr(ip, ipf::SRC.start), addr(ip, ipf::DST.start));
        checksum::pseudo_header_folded(s, d, proto::TCP, tcp_len as u16)
    } else {
        !fold(o.shared + tcp_len + words_sum(&t[..tcp::MIN_HEADER_LEN]) + o.payload_sum)
    };
    put16(t, tf::CHECKSUM, c);
}

#[cfg(test)]
mod tests;
