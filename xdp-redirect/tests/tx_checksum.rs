//! AF_XDP tx checksum offload (tx metadata, Linux 6.8+), copy mode on veth.
//!
//! Two pods at MTU 9000 whose eth0 keeps tx checksum offload on, so their
//! UDP and TCP frames reach the forwarder with only the pseudo-header sum in
//! the checksum field (CHECKSUM_PARTIAL). The forwarder (whole batches,
//! `Xsk::frames`) readdresses them and, while offload is asked for, marks
//! each with `RxBatch::set_tx_checksum`:
//! 1. with the request, UDP datagrams (single and multi-buffer) and a TCP
//!    echo cross and the receiving pod counts no checksum error;
//! 2. without it, the same datagrams are dropped by the receiving pod's
//!    stack and its `Udp InCsumErrors` grows by their number: the metadata
//!    is what made them pass;
//! 3. the same for a partial frame sent with `send_copy_with_checksum`
//!    (arrives) and with `send_copy` (dropped, counted).
//!
//! Afterwards every frame is accounted for and the kernel found no invalid
//! tx descriptor.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use common::*;
use sluice_xdp::{
    ChecksumError, RxBatch, SendChecksumError, SocketId, TX_METADATA_LEN, TxMetadata, Verdict, Xsk,
};

/// Destination and source MAC of frames towards one pod.
type Macs = ([u8; 6], [u8; 6]);

const MTU: &str = "9000";
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 12, 2);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 12, 3);
/// Datagrams per phase: alternately 200 and 8000 bytes (one chunk, three).
const DATAGRAMS: usize = 6;

/// Where the L4 checksum of an IPv4 UDP or TCP frame is: (start of the L4
/// header, offset of the field in it).
fn checksum_field(frame: &[u8]) -> Option<(u16, u16)> {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let l4 = 14 + usize::from(frame[14] & 0x0f) * 4;
    let offset = match frame[23] {
        6 => 16,
        17 => 6,
        _ => return None,
    };
    Some((l4 as u16, offset))
}

/// The folded IPv4 pseudo-header sum of `frame`: what the checksum field of
/// a CHECKSUM_PARTIAL frame holds.
fn pseudo_header_sum(frame: &[u8]) -> u16 {
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    fold(words_sum(&ip[12..20]) + u32::from(ip[9]) + (total - ihl) as u32)
}

/// The sum of `bytes` as big-endian 16-bit words (an even number of bytes).
fn words_sum(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum()
}

/// A ones'-complement sum folded to 16 bits.
fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// True if `frame`'s L4 checksum field holds only the pseudo-header sum.
fn is_partial(frame: &[u8]) -> bool {
    let Some((start, offset)) = checksum_field(frame) else {
        return false;
    };
    let at = usize::from(start + offset);
    frame.get(at..at + 2) == Some(&pseudo_header_sum(frame).to_be_bytes()[..])
}

/// A UDP frame from A to B (`dmac`, `smac`) on `dport` with `payload`, its
/// checksum field holding the pseudo-header sum only.
fn partial_udp_frame((dmac, smac): Macs, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(42 + payload.len());
    f.extend_from_slice(&dmac);
    f.extend_from_slice(&smac);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&POD_A.octets());
    ip[16..20].copy_from_slice(&POD_B.octets());
    let header_checksum = !fold(words_sum(&ip));
    ip[10..12].copy_from_slice(&header_checksum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&40001u16.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    let check = pseudo_header_sum(&f);
    f[40..42].copy_from_slice(&check.to_be_bytes());
    f
}

/// `(protocol, counter)` of a pod's `/proc/net/snmp`, e.g. `("Udp", "InCsumErrors")`.
fn snmp(ns: &NetNs, proto: &str, counter: &str) -> u64 {
    let text = ns.exec(&["cat", "/proc/net/snmp"]);
    let prefix = format!("{proto}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == counter)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no {proto} {counter} in {text}"))
}

/// Checksum errors a pod's UDP and TCP have counted.
fn csum_errors(ns: &NetNs) -> (u64, u64) {
    (
        snmp(ns, "Udp", "InCsumErrors"),
        snmp(ns, "Tcp", "InCsumErrors"),
    )
}

#[derive(Debug, Default)]
struct ForwardReport {
    packets: u64,
    partial: u64,
    offloaded: u64,
    offloaded_multi_buffer: u64,
}

/// One batch from one pod to the other: readdressed, forwarded, and marked
/// for checksum offload when `offload` is set.
fn forward_batch(
    xsk: &Xsk,
    batch: &mut RxBatch,
    to: SocketId,
    (dmac, smac): Macs,
    offload: bool,
    rep: &mut ForwardReport,
) {
    let mut fields = [None; 64];
    let mut chained = [false; 64];
    for (k, f) in xsk.frames(batch).enumerate() {
        let (chunk, off, len, conts) = f.into_parts();
        let data = &mut chunk[off..off + len];
        rep.packets += 1;
        if data.len() < 14 {
            continue;
        }
        data[0..6].copy_from_slice(&dmac);
        data[6..12].copy_from_slice(&smac);
        if is_partial(data) {
            rep.partial += 1;
        }
        fields[k] = Some(checksum_field(data));
        chained[k] = conts.len() > 0;
    }
    for (k, field) in fields.into_iter().enumerate().take(batch.len()) {
        let Some(field) = field else { continue };
        batch.set_verdict(k, Verdict::Forward(to));
        if let (true, Some((start, offset))) = (offload, field) {
            batch.set_tx_checksum(k, start, offset).unwrap();
            rep.offloaded += 1;
            rep.offloaded_multi_buffer += u64::from(chained[k]);
        }
    }
}

fn forward(
    xsk: &mut Xsk,
    (a, b): (SocketId, SocketId),
    (to_a, to_b): (Macs, Macs),
    offload: &AtomicBool,
    stop: &AtomicBool,
) -> ForwardReport {
    let mut rep = ForwardReport::default();
    let mut batch = xsk.batch();
    let fds = [a, b].map(|s| xsk.fd(s).unwrap().as_raw_fd());
    while !stop.load(Ordering::Relaxed) {
        let mut pfds = fds.map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: `pfds` is a live array of two pollfd structs.
        unsafe { libc::poll(pfds.as_mut_ptr(), 2, 5) };
        for (from, to, macs) in [(a, b, to_b), (b, a, to_a)] {
            xsk.recv(from, &mut batch).unwrap();
            let on = offload.load(Ordering::Relaxed);
            forward_batch(xsk, &mut batch, to, macs, on, &mut rep);
            xsk.complete(&mut batch).unwrap();
        }
        xsk.flush().unwrap();
    }
    rep
}

/// Sends `DATAGRAMS` datagrams from A to B's port `port`; returns the sizes B
/// received within a second.
fn datagrams(pa: &Pod, pb: &Pod, port: u16) -> Vec<usize> {
    let server = in_ns(&pb.ns.name, move || {
        let s = UdpSocket::bind(SocketAddrV4::new(POD_B, port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut buf = vec![0u8; 65536];
        let mut got = Vec::new();
        while let Ok((n, _)) = s.recv_from(&mut buf) {
            assert_eq!(buf[..n], pattern(n, n as u8)[..], "payload intact");
            got.push(n);
        }
        got
    });
    thread::sleep(Duration::from_millis(100));
    in_ns(&pa.ns.name, move || {
        let s = UdpSocket::bind(SocketAddrV4::new(POD_A, 0)).unwrap();
        for i in 0..DATAGRAMS {
            let n = [200, 8000][i % 2];
            s.send_to(&pattern(n, n as u8), SocketAddrV4::new(POD_B, port))
                .unwrap();
            thread::sleep(Duration::from_millis(20));
        }
    })
    .join()
    .unwrap();
    server.join().unwrap()
}

/// 1 MiB from A to B and back over TCP; true if it came back intact.
fn tcp_echo(pa: &Pod, pb: &Pod) -> bool {
    const LEN: usize = 1 << 20;
    let server = in_ns(&pb.ns.name, || {
        let l = TcpListener::bind(SocketAddrV4::new(POD_B, 7201)).unwrap();
        let (mut c, _) = l.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut data = Vec::new();
        c.read_to_end(&mut data).unwrap();
        c.write_all(&data).unwrap();
    });
    thread::sleep(Duration::from_millis(100));
    let ok = in_ns(&pa.ns.name, || {
        let mut c = TcpStream::connect_timeout(
            &SocketAddrV4::new(POD_B, 7201).into(),
            Duration::from_secs(5),
        )
        .unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let msg = pattern(LEN, 9);
        c.write_all(&msg).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).unwrap();
        back == msg
    })
    .join()
    .unwrap();
    server.join().unwrap();
    ok
}

/// Sends `frame` to B through `sb` (as a copy, with or without the checksum
/// request) and returns what B's socket on `port` received within half a
/// second.
fn copied_datagram(
    xsk: &mut Xsk,
    sb: SocketId,
    pb: &Pod,
    frame: &[u8],
    port: u16,
    with_checksum: bool,
) -> Option<usize> {
    let server = in_ns(&pb.ns.name, move || {
        let s = UdpSocket::bind(SocketAddrV4::new(POD_B, port)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut buf = vec![0u8; 65536];
        s.recv_from(&mut buf).ok().map(|(n, _)| n)
    });
    thread::sleep(Duration::from_millis(100));
    if with_checksum {
        xsk.send_copy_with_checksum(sb, &[frame], 34, 6).unwrap();
    } else {
        xsk.send_copy(sb, &[frame]).unwrap();
    }
    for _ in 0..50 {
        xsk.flush().unwrap();
        thread::sleep(Duration::from_millis(2));
    }
    server.join().unwrap()
}

#[test]
fn checksum_offload_makes_partial_frames_pass_and_only_it() {
    if !require_root("checksum_offload_makes_partial_frames_pass_and_only_it") {
        return;
    }
    // Offload left on in the pods: their frames leave CHECKSUM_PARTIAL.
    let pair = pod_pair("c", [POD_A, POD_B], MTU, true);
    let PodPair {
        pods: [pa, pb],
        mut node,
        mut xsk,
        sockets: [sa, sb],
    } = pair;
    assert!(
        matches!(
            xsk.tx_metadata(),
            TxMetadata::Registered {
                len: TX_METADATA_LEN
            }
        ),
        "Linux 6.18 takes tx metadata: {:?}",
        xsk.tx_metadata()
    );
    assert!(xsk.tx_checksum_offload());

    let offload = Arc::new(AtomicBool::new(true));
    let stop = Arc::new(AtomicBool::new(false));
    let (offload_fwd, stop_fwd) = (offload.clone(), stop.clone());
    let macs = ((pa.mac, pa.host_mac), (pb.mac, pb.host_mac));
    let fwd = thread::spawn(move || {
        let rep = forward(&mut xsk, (sa, sb), macs, &offload_fwd, &stop_fwd);
        (xsk, rep)
    });

    // 1. With the request: everything passes, no checksum error.
    let before = csum_errors(&pb.ns);
    let got = datagrams(&pa, &pb, 7200);
    assert_eq!(got.len(), DATAGRAMS, "all datagrams with offload: {got:?}");
    assert!(tcp_echo(&pa, &pb), "TCP echo intact with offload");
    assert_eq!(
        csum_errors(&pb.ns),
        before,
        "no checksum error with offload"
    );

    // 2. Without it: the same partial datagrams are dropped as bad checksums.
    offload.store(false, Ordering::Relaxed);
    let got = datagrams(&pa, &pb, 7202);
    let after = csum_errors(&pb.ns);
    eprintln!("without offload: received {got:?}, Udp InCsumErrors {before:?} -> {after:?}");
    assert!(
        got.is_empty(),
        "partial datagrams passed without offload: {got:?}"
    );
    assert_eq!(
        after.0 - before.0,
        DATAGRAMS as u64,
        "each one a checksum error"
    );

    stop.store(true, Ordering::Relaxed);
    let (mut xsk, rep) = fwd.join().unwrap();
    eprintln!("forwarder: {rep:?}");
    assert!(rep.partial > 0 && rep.offloaded > 0, "{rep:?}");
    assert!(
        rep.offloaded_multi_buffer > 0,
        "no multi-buffer frame offloaded: {rep:?}"
    );

    // 3. Copies: a partial frame passes with the request and is dropped without.
    let frame = partial_udp_frame((pb.mac, pb.host_mac), 7203, &pattern(300, 3));
    assert!(is_partial(&frame));
    assert_eq!(
        xsk.send_copy_with_checksum(sb, &[&frame], 34, 400),
        Err(SendChecksumError::Checksum(ChecksumError::OutOfData)),
        "a field past the frame is refused"
    );
    let before = csum_errors(&pb.ns);
    assert_eq!(
        copied_datagram(&mut xsk, sb, &pb, &frame, 7203, true),
        Some(300)
    );
    assert_eq!(csum_errors(&pb.ns), before);
    assert_eq!(
        copied_datagram(&mut xsk, sb, &pb, &frame, 7203, false),
        None
    );
    assert_eq!(csum_errors(&pb.ns).0, before.0 + 1);

    for s in [sa, sb] {
        let (stats, kernel) = (xsk.stats(s).unwrap(), xsk.kernel_stats(s).unwrap());
        eprintln!("{s:?}: {stats:?} {kernel:?}");
        assert_eq!(kernel.tx_invalid_descs, 0, "every tx descriptor valid");
        assert_eq!(stats.tx_csum_invalid, 0);
    }
    node.quiesce_and_audit(&mut xsk, &[sa, sb]);
    drop(xsk);
    node.cleanup();
}
