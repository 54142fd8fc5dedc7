//! Protocol state of one connection: [`CtState`], its timeouts ([`CtTimeouts`]) and the entry a
//! table keeps per connection ([`CtEntry`]) with the TCP state machine of Linux's `nf_conntrack`
//! (see the module doc of `conntrack` for the rules).

use super::{FlowDir, FlowKey, NS};
use crate::flow::proto;
use crate::wire::tcp::flags as tcp_flags;

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

/// One connection.
///
/// `repr(C)` keeps what a lookup reads (keys, expiry) in the first cache line of its pool slot.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct CtEntry<V> {
    pub(super) keys: [FlowKey; 2],
    pub(super) expires: u64,
    pub(super) last_seen: u64,
    pub(super) state: CtState,
    pub(super) value: V,
    pub(super) created: u64,
    pub(super) packets: [u64; 2],
    pub(super) bytes: [u64; 2],
}

impl<V> CtEntry<V> {
    pub(super) fn new(
        orig: FlowKey,
        reply: FlowKey,
        value: V,
        now: u64,
        timeouts: &CtTimeouts,
    ) -> Self {
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

#[cfg(test)]
mod tests {
    use super::super::test_support::*;

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
            src: [0, 0, 0, 1],
            dst: [0, 0, 0, 2],
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
}
