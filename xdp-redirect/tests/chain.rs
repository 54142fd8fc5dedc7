//! GRO output, through real rings: pod A sends UDP datagrams to pod B; they arrive in one batch
//! on A's socket; the first (the leader) gets its headers rewritten in place for the merged
//! datagram (seen through `Xsk::frames`, with the followers readable at the same time) and the
//! followers' payloads chained behind it as pieces (`RxBatch::append_piece`), without copying.
//! Pod B's UDP socket receives one datagram with the concatenated payloads and nothing else: the
//! followers are not sent on their own, whatever their verdict. Every chunk comes back through
//! the completion ring or the free list: a follower chunk that carries no piece, and every
//! follower chunk when the leader is dropped. The audit balances at the end.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::thread;
use std::time::Duration;

use common::*;
use sluice_xdp::{ChainError, FrameMut, RxBatch, SocketId, Verdict, Xsk};

const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 12, 2);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 12, 3);
const PORT: u16 = 5000;
/// Ethernet + IPv4 + UDP.
const HEADERS: usize = 14 + 20 + 8;

/// The IPv4 header checksum of `ip` (its checksum field counted as zero).
fn ip_checksum(ip: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for (k, w) in ip.chunks(2).enumerate() {
        if k != 5 {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Rewrites `frame`'s headers (Ethernet + IPv4 without options + UDP) for a datagram of `payload`
/// bytes to `dmac` from `smac`: lengths, IP checksum, UDP checksum 0 (none).
fn rewrite_udp(frame: &mut [u8], payload: usize, (dmac, smac): ([u8; 6], [u8; 6])) {
    frame[..6].copy_from_slice(&dmac);
    frame[6..12].copy_from_slice(&smac);
    frame[16..18].copy_from_slice(&((20 + 8 + payload) as u16).to_be_bytes());
    let sum = ip_checksum(&frame[14..34]);
    frame[24..26].copy_from_slice(&sum.to_be_bytes());
    frame[38..40].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
    frame[40..42].fill(0);
}

/// Pod A sends datagrams of `sizes` (payload `pattern(size, k)` for the k-th) to pod B; they
/// are received in one batch on `a`. Returns each packet's buffer lengths.
fn receive_datagrams(
    pair: &mut PodPair,
    a: SocketId,
    batch: &mut RxBatch,
    sizes: &[usize],
) -> Vec<Vec<usize>> {
    let to = SocketAddrV4::new(POD_B, PORT);
    let payloads: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(k, &n)| pattern(n, k as u8))
        .collect();
    in_ns(&pair.pods[0].ns.name, move || {
        let sock = std::net::UdpSocket::bind(SocketAddrV4::new(POD_A, 0)).unwrap();
        for p in payloads {
            sock.send_to(&p, to).unwrap();
        }
    })
    .join()
    .unwrap();
    // Let every datagram reach the rx ring, then take them in one batch.
    thread::sleep(Duration::from_millis(100));
    let n = pair.xsk.recv(a, batch).unwrap();
    assert_eq!(n, sizes.len(), "every datagram in one batch");
    (0..n)
        .map(|i| {
            let f = pair.xsk.frame(batch, i).unwrap();
            let bufs: Vec<usize> = std::iter::once(f.len())
                .chain((0..f.continuations()).map(|k| f.continuation(k).len()))
                .collect();
            assert_eq!(
                bufs.iter().sum::<usize>(),
                HEADERS + sizes[i],
                "datagram {i} in order"
            );
            bufs
        })
        .collect()
}

/// Through `Xsk::frames`, with every frame alive: reads the followers' UDP lengths (their chunks
/// readable) while rewriting the leader's headers (its first chunk writable) for a datagram of
/// the leader's payload plus `extra` follower bytes. Returns the followers' UDP payload lengths.
fn rewrite_leader(
    xsk: &Xsk,
    batch: &mut RxBatch,
    extra: usize,
    macs: ([u8; 6], [u8; 6]),
) -> Vec<usize> {
    let mut parts: Vec<_> = xsk.frames(batch).map(FrameMut::into_parts).collect();
    let (leader, followers) = parts.split_first_mut().unwrap();
    let udp_payloads: Vec<usize> = followers
        .iter()
        .map(|(chunk, off, _, _)| {
            usize::from(u16::from_be_bytes([chunk[off + 38], chunk[off + 39]])) - 8
        })
        .collect();
    let (chunk, off, len, _) = leader;
    let own = *len - HEADERS;
    rewrite_udp(&mut chunk[*off..*off + *len], own + extra, macs);
    udp_payloads
}

/// Waits until every queued packet completed, then checks the accounting.
fn settle(xsk: &mut Xsk) {
    for _ in 0..200 {
        xsk.flush().unwrap();
        if xsk.accounting().tx == 0 {
            break;
        }
        thread::sleep(Duration::from_millis(5));
    }
    let acc = xsk.accounting();
    assert!(acc.is_balanced(), "{acc:?}");
    assert_eq!((acc.held, acc.tx), (0, 0), "{acc:?}");
}

#[test]
fn followers_payloads_leave_chained_behind_their_leader() {
    if !require_root("followers_payloads_leave_chained_behind_their_leader") {
        return;
    }
    let mut pair = pod_pair("ch", [POD_A, POD_B], "9000", false);
    let [a, b] = pair.sockets;
    let to_b = (pair.pods[1].mac, pair.pods[1].host_mac);
    let mut batch = pair.xsk.batch();
    let sink_addr = SocketAddrV4::new(POD_B, PORT);

    // 1. Four datagrams, the second spanning two chunks, merged into one: the leader's own
    // descriptor, then the followers' payloads (the second's from both its chunks).
    let sizes = [1000, 5000, 1000, 1000];
    let sink = udp_sink(&pair.pods[1].ns.name, sink_addr, Duration::from_millis(500));
    let bufs = receive_datagrams(&mut pair, a, &mut batch, &sizes);
    assert_eq!(bufs[1].len(), 2, "the 5000-byte datagram spans two chunks");
    let extra: usize = sizes[1..].iter().sum();
    let followers = rewrite_leader(&pair.xsk, &mut batch, extra, to_b);
    assert_eq!(followers, &sizes[1..]);
    for (f, lens) in bufs.iter().enumerate().skip(1) {
        for (buf, &len) in lens.iter().enumerate() {
            let off = if buf == 0 { HEADERS } else { 0 };
            batch.append_piece(0, f, buf, off, len - off).unwrap();
        }
        // Ignored: a follower leaves with its leader only.
        batch.set_verdict(f, Verdict::Forward(b));
    }
    assert_eq!(
        batch.append_piece(1, 2, 0, 0, 1),
        Err(ChainError::LeaderIsFollower)
    );
    batch.set_verdict(0, Verdict::Forward(b));
    let before = (pair.xsk.stats(b).unwrap(), pair.xsk.accounting());
    pair.xsk.complete(&mut batch).unwrap();
    let acc = pair.xsk.accounting();
    assert_eq!(
        acc.tx - before.1.tx,
        5,
        "one packet of five descriptors queued"
    );
    assert!(acc.is_balanced(), "{acc:?}");
    settle(&mut pair.xsk);
    let stats = pair.xsk.stats(b).unwrap();
    assert_eq!(stats.tx_packets - before.0.tx_packets, 1);
    assert_eq!(
        stats.tx_completed - before.0.tx_completed,
        5,
        "every descriptor completed"
    );
    let want: Vec<u8> = sizes
        .iter()
        .enumerate()
        .flat_map(|(k, &n)| pattern(n, k as u8))
        .collect();
    assert_arrived(&sink.join().unwrap(), &[want], "datagram");

    // 2. A follower whose second chunk carries no piece: that chunk goes to the free list while
    // the first one travels with the leader.
    let sizes = [1000, 5000];
    let sink = udp_sink(&pair.pods[1].ns.name, sink_addr, Duration::from_millis(500));
    let bufs = receive_datagrams(&mut pair, a, &mut batch, &sizes);
    let part = bufs[1][0] - HEADERS;
    rewrite_leader(&pair.xsk, &mut batch, part, to_b);
    batch.append_piece(0, 1, 0, HEADERS, part).unwrap();
    batch.set_verdict(0, Verdict::Forward(b));
    let before = pair.xsk.accounting();
    pair.xsk.complete(&mut batch).unwrap();
    let acc = pair.xsk.accounting();
    assert_eq!(acc.tx - before.tx, 2, "the leader's chunk and the piece's");
    assert_eq!(acc.free - before.free, 1, "the follower's unused chunk");
    settle(&mut pair.xsk);
    let want = [pattern(1000, 0), pattern(5000, 1)[..part].to_vec()].concat();
    assert_arrived(&sink.join().unwrap(), &[want], "datagram");

    // 3. The leader dropped: every follower chunk goes back with it, nothing leaves.
    let sizes = [1000, 5000, 1000];
    let sink = udp_sink(&pair.pods[1].ns.name, sink_addr, Duration::from_millis(300));
    let bufs = receive_datagrams(&mut pair, a, &mut batch, &sizes);
    for (f, lens) in bufs.iter().enumerate().skip(1) {
        for (buf, &len) in lens.iter().enumerate() {
            batch.append_piece(0, f, buf, 0, len).unwrap();
        }
        batch.set_verdict(f, Verdict::Forward(b));
    }
    let before = pair.xsk.accounting();
    pair.xsk.complete(&mut batch).unwrap();
    let acc = pair.xsk.accounting();
    assert_eq!(acc.tx, before.tx, "nothing queued");
    assert_eq!(acc.free - before.free, 4, "every chunk of the batch back");
    assert_eq!(acc.held, 0);
    assert!(sink.join().unwrap().is_empty(), "nothing arrived");

    pair.node.quiesce_and_audit(&mut pair.xsk, &pair.sockets);
    drop(pair.xsk);
    pair.node.cleanup();
}
