//! Software TSO and IPv4 fragmentation: a frame larger than its route carries is cut into frames
//! that fit (DESIGN, "MTU strategy").
//!
//! Owns: the decision what to do with an oversized IPv4 frame ([`plan`]), the writing of its
//! pieces into buffers the caller provides ([`Segmenter::write_next`]), the ICMP answer for
//! frames that may not be fragmented ([`frag_needed`]), and VXLAN encapsulation of every piece of
//! a flow with that flow's outer source port ([`FlowTunnel`]).
//!
//! Guarantees, for TCP (not SYN, not RST, not a fragment), as Linux's `tcp_gso_segment` and
//! `inet_gso_segment` do:
//! - every segment is a complete Ethernet + IPv4 + TCP frame whose headers are the original's
//!   (IP and TCP options included) except: IP total length; IP identification, the original's
//!   plus the segment's index (wrapping); sequence number advanced by the payload before it;
//!   CWR only on the first segment, FIN and PSH only on the last; an urgent pointer that still
//!   points at the original's urgent data (URG cleared on segments after it);
//! - each segment carries at most `max_ip_len - IP header - TCP header` payload bytes, all but the
//!   last exactly that many, so every segment's IP packet is at most `max_ip_len` bytes;
//! - the IP header checksum and the TCP checksum of every segment are complete, whatever the
//!   original's TCP checksum field held (complete or CHECKSUM_PARTIAL): the payload is copied and
//!   summed in one pass ([`WordSum::copy_from`]); headers are summed once per frame.
//!
//! For other packets, as a router does (RFC 1812 section 5.2.6 and 4.3.2.3; TCP SYN and RST, which
//! TSO never carries, are treated as other packets): DF set yields [`Oversize::FragNeeded`] and
//! [`frag_needed`] builds the ICMP "fragmentation needed" (type 3 code 4) with the next-hop MTU;
//! DF clear yields IPv4 fragments: the original IP header on each (options that RFC 791 says are
//! not copied become NOPs after the first fragment), offsets in 8-byte units added to the
//! original's, MF on all but the last (which keeps the original's MF), the identification kept,
//! each header checksum computed.
//!
//! Must not: allocate, read a clock, or panic on any input (the fuzz target `segment` drives
//! [`plan`], [`Segmenter::write_next`] and [`frag_needed`] over arbitrary bytes). The original
//! frame is only read.
//!
//! # How a worker drives it
//! Call it on the inner frame after routing has rewritten it (NAT, TTL, inner MACs) and before
//! encapsulation, when its IP length exceeds the route's MTU (underlay MTU - 50 over VXLAN):
//! ```text
//! match segment::plan(&frame, vxlan_mtu)? {
//!     Oversize::Fits => { /* encap and send the frame as today */ }
//!     Oversize::Split(mut seg) => {
//!         let tun = FlowTunnel::new(tunnel, seg.flow_key());     // one outer source port
//!         while !seg.is_done() {
//!             let chunk = umem.alloc();                          // plus tail chunks if
//!             let w = seg.write_next(chunk, HEADROOM, &mut [])?; // seg.max_frame_len() needs them
//!             let mut f = Frame::new(chunk, HEADROOM, w.head_len);
//!             tun.encap(&mut f, state.next_ip_id())?;           // HEADROOM >= vxlan::OVERHEAD
//!             tx.push(f.offset(), f.len());
//!         }
//!         /* the original's chunks go back to the fill ring */
//!     }
//!     Oversize::FragNeeded { mtu } => {
//!         let n = segment::frag_needed(&frame, mtu, node_vtep_ip, state.next_ip_id(), out)?;
//!         /* send `out[..n]` back to the port the frame came from; drop the frame */
//!     }
//! }
//! ```
//! [`Segmenter::write_next`] writes one output packet at `head[start..]`, continuing into the
//! `tail` buffers in order (each filled to its length) when `head` is full, and says how many bytes
//! went where ([`Written`]); it refuses with [`SegmentError::OutputTooSmall`] before writing
//! anything if the buffers cannot hold the packet, so the worker may retry with more. A frame of
//! at most 64 KiB cut for a 1450-byte MTU makes 47 segments.

use crate::checksum;
use crate::flow::FlowKey;
use crate::flow::proto;
use crate::frame::Frame;
use crate::vxlan::{self, Tunnel, VxlanError};
use crate::wire::ipv4::field as ip_field;
use crate::wire::tcp::field as tcp_field;
use crate::wire::{WireError, be16, ethernet, icmp, ipv4, put16, tcp};
use crate::wordsum::WordSum;

/// The smallest IP packet every IPv4 link must carry (RFC 791); a smaller `max_ip_len` is refused.
pub const MIN_IP_MTU: usize = 68;
/// How long an ICMP error may be: it quotes as much of the offending datagram as fits in 576 bytes
/// (RFC 1812 section 4.3.2.3, as Linux's `icmp_send`).
pub const ICMP_ERROR_MAX: usize = 576;
/// TOS of ICMP errors: precedence "internetwork control" (Linux's `IPTOS_PREC_INTERNETCONTROL`).
const ICMP_TOS: u8 = 0xc0;
/// TTL of ICMP errors.
const ICMP_TTL: u8 = 64;

const L3: usize = ethernet::HEADER_LEN;

/// Why a frame could not be planned or a piece not written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentError {
    /// The frame is not Ethernet + IPv4.
    NotIpv4,
    /// A header is truncated or inconsistent with the frame (IHL, total length, data offset).
    Malformed,
    /// The headers do not all lie in the frame's first buffer.
    HeadersSplit,
    /// The maximum packet size is below 68 bytes or leaves no room for payload after the headers.
    MtuTooSmall,
    /// The output buffers cannot hold the next packet; nothing was written.
    OutputTooSmall,
    /// Every piece has been written already.
    Done,
    /// No ICMP error may answer this frame (it is an ICMP error, a later fragment, or from a
    /// source that is not a unicast host, RFC 1812 section 4.3.2.7).
    NoIcmp,
}

/// What to do with a frame for a route whose MTU is `max_ip_len`.
#[derive(Debug)]
pub enum Oversize<'f> {
    /// The IP packet fits: send the frame as it is.
    Fits,
    /// Cut it: TCP segments or IPv4 fragments, written one by one.
    Split(Segmenter<'f>),
    /// DF set and not cut by TSO: answer the sender with [`frag_needed`] announcing `mtu`, drop
    /// the frame.
    FragNeeded { mtu: u16 },
}

/// Decide what to do with `frame` (Ethernet + IPv4, headers in the first buffer) for a route that
/// carries IP packets of at most `max_ip_len` bytes. Bytes after the IP total length (Ethernet
/// padding) are ignored.
pub fn plan<'f>(frame: &'f Frame<'_>, max_ip_len: usize) -> Result<Oversize<'f>, SegmentError> {
    let head = frame.head();
    let eth = ethernet::Packet::new_checked(head).map_err(|_| SegmentError::Malformed)?;
    if eth.ethertype() != ethernet::ethertype::IPV4 {
        return Err(SegmentError::NotIpv4);
    }
    let ip = ipv4::Packet::new_checked(eth.payload()).map_err(|e| split_or(frame, e))?;
    let ip_hl = ip.header_len();
    let total = usize::from(ip.total_len());
    if total < ip_hl || L3 + total > frame.total_len() {
        return Err(SegmentError::Malformed);
    }
    if total <= max_ip_len {
        return Ok(Oversize::Fits);
    }
    if max_ip_len < MIN_IP_MTU {
        return Err(SegmentError::MtuTooSmall);
    }
    let max_ip_len = max_ip_len.min(usize::from(u16::MAX));
    let l4 = L3 + ip_hl;
    let flow = flow_key(head, &ip, l4);
    if ip.protocol() == proto::TCP && !ip.is_fragment() {
        let t = head
            .get(l4..)
            .ok_or(WireError::Truncated)
            .and_then(tcp::Packet::new_checked)
            .map_err(|e| split_or(frame, e))?;
        let tcp_hl = t.header_len();
        if ip_hl + tcp_hl > total {
            return Err(SegmentError::Malformed);
        }
        if t.flags() & (tcp::flags::SYN | tcp::flags::RST) == 0 {
            if max_ip_len <= ip_hl + tcp_hl {
                return Err(SegmentError::MtuTooSmall);
            }
            let hdr = &head[..l4 + tcp_hl];
            let tcp = TcpCut::new(hdr, ip_hl);
            let per = max_ip_len - ip_hl - tcp_hl;
            return Ok(Oversize::Split(Segmenter::new(
                frame,
                hdr,
                total - ip_hl - tcp_hl,
                per,
                Cut::Tcp(tcp),
                flow,
            )));
        }
    }
    if ip.dont_frag() {
        return Ok(Oversize::FragNeeded {
            mtu: max_ip_len as u16,
        });
    }
    let per = (max_ip_len - ip_hl) & !7;
    if per == 0 {
        return Err(SegmentError::MtuTooSmall);
    }
    let frag_word = be16(head, L3 + ip_field::FLAGS_FRAG);
    Ok(Oversize::Split(Segmenter::new(
        frame,
        &head[..l4],
        total - ip_hl,
        per,
        Cut::Fragments { frag_word },
        flow,
    )))
}

/// The error for a header view that could not be made: a header cut short by the end of the
/// first buffer of a chained frame is split, anything else malformed.
fn split_or(frame: &Frame<'_>, e: WireError) -> SegmentError {
    match e {
        WireError::Truncated if frame.is_chained() => SegmentError::HeadersSplit,
        _ => SegmentError::Malformed,
    }
}

/// The conntrack key of the frame's flow, as `nat::Tuple::of` makes it from a parsed packet
/// (ports for TCP and UDP, the echo identifier for ICMP echo, zero otherwise).
fn flow_key(head: &[u8], ip: &ipv4::Packet<&[u8]>, l4: usize) -> FlowKey {
    let word = |at: usize| {
        head.get(l4 + at..l4 + at + 2)
            .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]))
    };
    let (src_port, dst_port) = match ip.protocol() {
        _ if ip.frag_offset() != 0 => (0, 0),
        proto::TCP | proto::UDP => (word(0), word(2)),
        proto::ICMP => match head.get(l4) {
            Some(&icmp::kind::ECHO_REQUEST | &icmp::kind::ECHO_REPLY) => (word(4), word(4)),
            _ => (0, 0),
        },
        _ => (0, 0),
    };
    FlowKey {
        src: ip.src(),
        dst: ip.dst(),
        src_port,
        dst_port,
        proto: ip.protocol(),
    }
}

/// How the pieces are cut.
#[derive(Clone, Copy, Debug)]
enum Cut {
    Tcp(TcpCut),
    /// IPv4 fragments; `frag_word` is the original's flags and fragment offset word.
    Fragments {
        frag_word: u16,
    },
}

/// What TSO needs per segment from the original's headers, summed once.
#[derive(Clone, Copy, Debug)]
struct TcpCut {
    ip_hl: usize,
    ident: u16,
    seq: u32,
    /// Data offset and flags, as the 16-bit word at `tcp_field::DATA_OFF`.
    off_flags: u16,
    urg_ptr: u16,
    /// Sum of the IP header without total length, identification and checksum.
    ip_sum: u32,
    /// Sum of the TCP header without sequence number, data offset and flags, checksum and urgent
    /// pointer, plus the pseudo-header without its length.
    tcp_sum: u32,
}

/// The unfolded sum of the 16-bit words of `b`, leaving out the words at the offsets in `skip`.
fn words_sum(b: &[u8], skip: &[usize]) -> u32 {
    b.chunks_exact(2)
        .enumerate()
        .filter(|(i, _)| !skip.contains(&(2 * i)))
        .map(|(_, w)| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum()
}

fn fold32(mut s: u32) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

impl TcpCut {
    /// `hdr` is Ethernet + IPv4 (`ip_hl` bytes) + TCP header, checked by [`plan`].
    fn new(hdr: &[u8], ip_hl: usize) -> Self {
        let ip = &hdr[L3..L3 + ip_hl];
        let t = &hdr[L3 + ip_hl..];
        let (src, dst) =
            ipv4::Packet::new_checked(ip).map_or(([0; 4], [0; 4]), |p| (p.src(), p.dst()));
        let pseudo = checksum::pseudo_header_sum(src, dst, proto::TCP, 0);
        Self {
            ip_hl,
            ident: be16(ip, ip_field::IDENT),
            seq: tcp::Packet::new_checked(t).map_or(0, |p| p.seq()),
            off_flags: be16(t, tcp_field::DATA_OFF),
            urg_ptr: be16(t, tcp_field::URG_PTR),
            ip_sum: words_sum(
                ip,
                &[ip_field::TOTAL_LEN, ip_field::IDENT, ip_field::CHECKSUM],
            ),
            tcp_sum: pseudo
                + words_sum(
                    t,
                    &[
                        tcp_field::SEQ,
                        tcp_field::SEQ + 2,
                        tcp_field::DATA_OFF,
                        tcp_field::CHECKSUM,
                        tcp_field::URG_PTR,
                    ],
                ),
        }
    }

    /// Patch the copied headers `out` (Ethernet onwards) of segment `index`, which carries
    /// `len` payload bytes from payload offset `done`, is the last or not, and whose payload sums
    /// to `payload` (folded, network order).
    fn patch(
        &self,
        out: &mut [u8],
        index: usize,
        done: usize,
        len: usize,
        last: bool,
        payload: u16,
    ) {
        let (ip, t) = out[L3..].split_at_mut(self.ip_hl);
        let tcp_len = t.len() + len;
        let ip_len = (self.ip_hl + tcp_len) as u16;
        let ident = self.ident.wrapping_add(index as u16);
        put16(ip, ip_field::TOTAL_LEN, ip_len);
        put16(ip, ip_field::IDENT, ident);
        let ip_sum = self.ip_sum + u32::from(ip_len) + u32::from(ident);
        put16(ip, ip_field::CHECKSUM, !fold32(ip_sum));

        let seq = self.seq.wrapping_add(done as u32);
        let mut off_flags = self.off_flags;
        if index > 0 {
            off_flags &= !u16::from(tcp::flags::CWR);
        }
        if !last {
            off_flags &= !u16::from(tcp::flags::FIN | tcp::flags::PSH);
        }
        let mut urg_ptr = 0;
        if off_flags & u16::from(tcp::flags::URG) != 0 {
            // The urgent pointer is an offset from the segment's sequence number.
            match usize::from(self.urg_ptr).checked_sub(done) {
                Some(p) if p > 0 => urg_ptr = p as u16,
                _ => off_flags &= !u16::from(tcp::flags::URG),
            }
        }
        t[tcp_field::SEQ..tcp_field::SEQ + 4].copy_from_slice(&seq.to_be_bytes());
        put16(t, tcp_field::DATA_OFF, off_flags);
        put16(t, tcp_field::URG_PTR, urg_ptr);
        let sum = self.tcp_sum
            + (seq >> 16)
            + (seq & 0xffff)
            + u32::from(off_flags)
            + u32::from(urg_ptr)
            + tcp_len as u32
            + u32::from(payload);
        put16(t, tcp_field::CHECKSUM, !fold32(sum));
    }
}

/// Reads a frame's payload, from an offset in its first buffer on through its tail buffers, never
/// past the IP total length.
#[derive(Debug)]
struct Reader<'f> {
    cur: &'f [u8],
    rest: &'f [&'f [u8]],
    left: usize,
}

impl<'f> Reader<'f> {
    /// The next unread bytes of the current buffer (empty once everything was read).
    fn peek(&mut self) -> &'f [u8] {
        while self.cur.is_empty() {
            match self.rest.split_first() {
                Some((first, rest)) => {
                    self.cur = first;
                    self.rest = rest;
                }
                None => return &[],
            }
        }
        &self.cur[..self.cur.len().min(self.left)]
    }

    fn advance(&mut self, n: usize) {
        self.cur = &self.cur[n..];
        self.left -= n;
    }
}

/// Where one output packet went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    /// Bytes of the packet (an Ethernet frame), over all buffers.
    pub len: usize,
    /// Of those, bytes in the first buffer from `start`: the packet's window there.
    pub head_len: usize,
    /// Tail buffers used; all but the last filled to their length.
    pub tail_bufs: usize,
    /// Bytes in the last tail buffer used (0 when no tail buffer was used).
    pub last_tail_len: usize,
}

/// The pieces of one oversized frame, written one at a time (see the module doc).
#[derive(Debug)]
pub struct Segmenter<'f> {
    /// Headers copied in front of each piece: Ethernet + IPv4 (+ TCP for TSO).
    hdr: &'f [u8],
    cut: Cut,
    payload: Reader<'f>,
    /// Payload bytes in all (what follows `hdr` in the original, up to its IP total length).
    total: usize,
    /// Payload bytes written so far.
    done: usize,
    /// Payload bytes per piece, all but the last.
    per: usize,
    /// Pieces written so far.
    index: usize,
    flow: FlowKey,
}

impl<'f> Segmenter<'f> {
    fn new(
        frame: &'f Frame<'_>,
        hdr: &'f [u8],
        total: usize,
        per: usize,
        cut: Cut,
        flow: FlowKey,
    ) -> Self {
        let head = frame.head();
        let end = head.len().min(hdr.len() + total);
        Self {
            hdr,
            cut,
            payload: Reader {
                cur: &head[hdr.len()..end],
                rest: frame.tail(),
                left: total,
            },
            total,
            done: 0,
            per,
            index: 0,
            flow,
        }
    }

    /// Whether these are TCP segments (else IPv4 fragments).
    pub fn is_tcp(&self) -> bool {
        matches!(self.cut, Cut::Tcp(_))
    }

    /// How many packets the frame is cut into.
    pub fn count(&self) -> usize {
        self.total.div_ceil(self.per).max(1)
    }

    /// Whether every packet has been written.
    pub fn is_done(&self) -> bool {
        self.done == self.total
    }

    /// The frame length (Ethernet header included) of the next packet, `None` when done.
    pub fn next_len(&self) -> Option<usize> {
        (!self.is_done()).then(|| self.hdr.len() + (self.total - self.done).min(self.per))
    }

    /// The frame length of the largest packet: what the output buffers of one call must hold.
    pub fn max_frame_len(&self) -> usize {
        self.hdr.len() + self.per.min(self.total)
    }

    /// The flow's conntrack key (for [`FlowTunnel::new`]: the same outer source port as
    /// `route::forward` gives the flow's other packets).
    pub fn flow_key(&self) -> FlowKey {
        self.flow
    }

    /// Write the next packet at `head[start..]`, continuing into `tail` (see the module doc).
    pub fn write_next(
        &mut self,
        head: &mut [u8],
        start: usize,
        tail: &mut [&mut [u8]],
    ) -> Result<Written, SegmentError> {
        let Some(frame_len) = self.next_len() else {
            return Err(SegmentError::Done);
        };
        let hl = self.hdr.len();
        let len = frame_len - hl;
        let room = head.len().saturating_sub(start);
        if room < hl || room - hl + tail.iter().map(|b| b.len()).sum::<usize>() < len {
            return Err(SegmentError::OutputTooSmall);
        }
        let out = &mut head[start..];
        let last = self.done + len == self.total;
        out[..hl].copy_from_slice(self.hdr);
        let (hdr_out, body) = out.split_at_mut(hl);
        let placed = match self.cut {
            Cut::Tcp(t) => {
                let mut sum = WordSum::new();
                let placed = copy_payload(&mut self.payload, body, tail, len, |d, s| {
                    sum.copy_from(d, s)
                });
                t.patch(hdr_out, self.index, self.done, len, last, sum.fold());
                placed
            }
            Cut::Fragments { frag_word } => {
                let placed = copy_payload(&mut self.payload, body, tail, len, |d, s| {
                    d.copy_from_slice(s)
                });
                self.patch_fragment(hdr_out, frag_word, len, last);
                placed
            }
        };
        self.done += len;
        self.index += 1;
        Ok(Written {
            len: frame_len,
            head_len: hl + placed.head,
            tail_bufs: placed.tail_bufs,
            last_tail_len: placed.last,
        })
    }

    /// Patch the copied IPv4 header (`out`: Ethernet onwards) of the next fragment.
    fn patch_fragment(&self, out: &mut [u8], frag_word: u16, len: usize, last: bool) {
        let ip = &mut out[L3..];
        let ip_hl = ip.len();
        put16(ip, ip_field::TOTAL_LEN, (ip_hl + len) as u16);
        let offset = ((frag_word & 0x1fff) + (self.done / 8) as u16) & 0x1fff;
        let more = !last || frag_word & ipv4::FLAG_MF != 0;
        let flags = (frag_word & !(0x1fff | ipv4::FLAG_MF)) | if more { ipv4::FLAG_MF } else { 0 };
        put16(ip, ip_field::FLAGS_FRAG, flags | offset);
        if self.index > 0 {
            strip_uncopied_options(&mut ip[ipv4::MIN_HEADER_LEN..]);
        }
        put16(ip, ip_field::CHECKSUM, 0);
        let c = checksum::checksum(ip);
        put16(ip, ip_field::CHECKSUM, c);
    }
}

/// Replace the IPv4 options whose "copied" bit is clear with NOPs (as Linux's
/// `ip_options_fragment`), keeping the header length. A malformed option ends the walk, the rest
/// becoming NOPs.
fn strip_uncopied_options(opts: &mut [u8]) {
    const EOL: u8 = 0;
    const NOP: u8 = 1;
    let mut i = 0;
    while i < opts.len() {
        match opts[i] {
            EOL => break,
            NOP => i += 1,
            kind => {
                let len = opts.get(i + 1).map_or(0, |&l| usize::from(l));
                if len < 2 || i + len > opts.len() {
                    opts[i..].fill(NOP);
                    break;
                }
                if kind & 0x80 == 0 {
                    opts[i..i + len].fill(NOP);
                }
                i += len;
            }
        }
    }
}

/// Payload bytes placed: in the first buffer, and in the tail buffers.
struct Placed {
    head: usize,
    tail_bufs: usize,
    last: usize,
}

/// Copy `len` bytes from `src` into `first`, then `tail` in order, each buffer filled up, with
/// `copy` (which may sum what it copies). The caller checked the buffers hold `len` bytes.
fn copy_payload(
    src: &mut Reader<'_>,
    first: &mut [u8],
    tail: &mut [&mut [u8]],
    mut len: usize,
    mut copy: impl FnMut(&mut [u8], &[u8]),
) -> Placed {
    let mut placed = Placed {
        head: 0,
        tail_bufs: 0,
        last: 0,
    };
    let mut dst: &mut [u8] = first;
    let mut used = 0;
    let mut outs = tail.iter_mut();
    let mut in_tail = 0; // 0: the first buffer; n: tail buffer n - 1
    while len > 0 {
        if used == dst.len() {
            let Some(next) = outs.next() else { break };
            dst = next;
            used = 0;
            in_tail += 1;
            continue;
        }
        let piece = src.peek();
        if piece.is_empty() {
            break;
        }
        let n = piece.len().min(dst.len() - used).min(len);
        copy(&mut dst[used..used + n], &piece[..n]);
        src.advance(n);
        used += n;
        len -= n;
        if in_tail == 0 {
            placed.head = used;
        } else {
            placed.tail_bufs = in_tail;
            placed.last = used;
        }
    }
    placed
}

/// Build the ICMP "fragmentation needed" (type 3 code 4) answering `frame`, announcing `mtu`, at
/// the start of `out`: Ethernet back to the frame's source MAC from its destination MAC, IPv4 from
/// `src` (the address the sender sees this hop as, e.g. the node's VTEP address) to the frame's
/// source, TOS 0xc0, TTL 64, identification `ip_id`, DF clear, and the ICMP message quoting the
/// frame's IP datagram up to 576 bytes in all. Returns the frame length written.
pub fn frag_needed(
    frame: &Frame<'_>,
    mtu: u16,
    src: [u8; 4],
    ip_id: u16,
    out: &mut [u8],
) -> Result<usize, SegmentError> {
    let head = frame.head();
    let eth = ethernet::Packet::new_checked(head).map_err(|_| SegmentError::Malformed)?;
    if eth.ethertype() != ethernet::ethertype::IPV4 {
        return Err(SegmentError::NotIpv4);
    }
    let ip = ipv4::Packet::new_checked(eth.payload()).map_err(|_| SegmentError::Malformed)?;
    let total = usize::from(ip.total_len());
    if total < ip.header_len() || L3 + total > frame.total_len() {
        return Err(SegmentError::Malformed);
    }
    let icmp_error = ip.protocol() == proto::ICMP
        && head
            .get(L3 + ip.header_len()..)
            .and_then(|m| icmp::Packet::new_checked(m).ok())
            .is_none_or(|m| m.is_error());
    let [a, ..] = ip.src();
    let unicast_src = a != 0 && a != 127 && a < 224;
    if icmp_error || ip.frag_offset() != 0 || !unicast_src {
        return Err(SegmentError::NoIcmp);
    }
    let quote = total.min(ICMP_ERROR_MAX - ipv4::MIN_HEADER_LEN - icmp::HEADER_LEN);
    let icmp_at = L3 + ipv4::MIN_HEADER_LEN;
    let n = icmp_at + icmp::HEADER_LEN + quote;
    let out = out.get_mut(..n).ok_or(SegmentError::OutputTooSmall)?;
    let wire = |_| SegmentError::OutputTooSmall;
    ethernet::Repr {
        dst: eth.src(),
        src: eth.dst(),
        ethertype: ethernet::ethertype::IPV4,
    }
    .emit(out)
    .map_err(wire)?;
    ipv4::Repr {
        src,
        dst: ip.src(),
        protocol: proto::ICMP,
        tos: (ip.tos() & 0x1e) | ICMP_TOS,
        ident: ip_id,
        dont_frag: false,
        ttl: ICMP_TTL,
        payload_len: (icmp::HEADER_LEN + quote) as u16,
    }
    .emit(&mut out[L3..])
    .map_err(wire)?;
    icmp::Repr::frag_needed(mtu)
        .emit(&mut out[icmp_at..])
        .map_err(wire)?;
    let mut at = icmp_at + icmp::HEADER_LEN;
    for chunk in frame.chunks_from(L3) {
        let take = chunk.len().min(n - at);
        out[at..at + take].copy_from_slice(&chunk[..take]);
        at += take;
        if at == n {
            break;
        }
    }
    let mut m = icmp::Packet::new_checked(&mut out[icmp_at..]).map_err(wire)?;
    m.fill_checksum();
    Ok(n)
}

/// VXLAN encapsulation for every piece of one flow with the same outer UDP source port: the one
/// `route::forward` gives the flow's unsegmented packets (`vxlan::src_port` of the flow hash), so
/// the underlay's ECMP keeps the flow on one path and the receiver's RSS on one queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowTunnel {
    tunnel: Tunnel,
    src_port: u16,
}

impl FlowTunnel {
    /// The tunnel towards a remote node for the flow `flow` ([`Segmenter::flow_key`]).
    pub fn new(tunnel: Tunnel, flow: FlowKey) -> Self {
        Self {
            tunnel,
            src_port: vxlan::src_port(flow.hash64()),
        }
    }

    /// The outer UDP source port every piece gets.
    pub fn src_port(&self) -> u16 {
        self.src_port
    }

    /// Encapsulate one piece (a frame over the buffers [`Segmenter::write_next`] filled, with at
    /// least `vxlan::OVERHEAD` bytes of headroom); `ip_id` is the outer identification.
    pub fn encap(&self, piece: &mut Frame<'_>, ip_id: u16) -> Result<(), VxlanError> {
        vxlan::encap(piece, &self.tunnel, self.src_port, ip_id)
    }
}

#[cfg(test)]
pub(crate) mod tests;
