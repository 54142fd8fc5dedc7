//! Software TSO output, through real rings: a multi-buffer frame that pod A sends is received on
//! its socket and, staying in its batch, becomes the source of new packets (`Xsk::emit_from`):
//! each is written into fresh chunks (a first chunk with room in front for a header pushed
//! afterwards, tail chunks when it is larger than one) and queued as a descriptor chain on pod B's
//! socket. Pod B's packet socket receives exactly those bytes. Then the limits: a packet spanning
//! more chunks than allowed, a full tx queue, an exhausted free list (its chunks lent away) and
//! unknown packets or sockets stop an emission with their reason and take nothing. The accounting balances throughout and the audit at the end.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use common::*;
use sluice_xdp::xsk::MAX_SEGMENTS;
use sluice_xdp::{EmitError, Emitted, SendError, SocketId};

const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 11, 2);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 11, 3);
/// IEEE 802 local experimental EtherTypes: the emitted packets the capture looks for, and the
/// flood that fills the tx queue (which pod B's stack drops).
const ETHERTYPE: u16 = 0x88b5;
const FLOOD: u16 = 0x88b6;
/// The source: Ethernet + IPv4 + UDP + 8000 bytes, three 4 KiB chunks.
const SOURCE_LEN: usize = 14 + 20 + 8 + 8000;
/// The byte ranges of the source each emitted packet carries behind its header (the whole
/// source among them: that one spans a first chunk and a tail chunk).
const RANGES: [std::ops::Range<usize>; 5] = [
    0..60,
    100..1500,
    0..SOURCE_LEN,
    2000..7000,
    7990..SOURCE_LEN,
];

#[test]
fn packets_emitted_from_a_received_frame_reach_the_peer() {
    if !require_root("packets_emitted_from_a_received_frame_reach_the_peer") {
        return;
    }
    let mut pair = pod_pair("em", [POD_A, POD_B], "9000", false);
    let [a, b] = pair.sockets;
    let eth = ethernet(pair.pods[1].mac, pair.pods[1].host_mac, ETHERTYPE);
    let xsk = &mut pair.xsk;
    let capture = capture_in(
        &pair.pods[1].ns.name,
        ETHERTYPE,
        RANGES.len(),
        Duration::from_secs(3),
    );

    send_udp(
        &pair.pods[0].ns.name,
        POD_A,
        SocketAddrV4::new(POD_B, 9),
        pattern(8000, 7),
    );
    let mut batch = xsk.batch();
    let i = recv_packet(xsk, a, &mut batch, |len| len == SOURCE_LEN);
    let before = xsk.accounting();
    assert!(before.is_balanced(), "{before:?}");

    let mut expected = Vec::new();
    let (tail_chunk, data_start) = {
        let (src, mut out) = xsk.emit_from(&mut batch, i, b).unwrap();
        let (chunk, off, len, conts) = src.into_parts();
        let bufs: Vec<&[u8]> = std::iter::once(&chunk[off..off + len])
            .chain(conts)
            .collect();
        assert_eq!(bufs.len(), 3, "the source spans three chunks");
        let mut data_start = 0;
        for (k, range) in RANGES.iter().enumerate() {
            let tag = [k as u8, 0xee];
            let mut body = vec![&tag[..]];
            body.extend(sub_slices(&bufs, range.clone()));
            let body_len = 2 + range.len();
            // Written `eth.len()` bytes after the first place a descriptor may start, then the
            // Ethernet header pushed in front, as an encapsulation would be.
            let tails = out.tail_chunks_for(body_len, eth.len());
            let mut txb = out.buffers(tails).unwrap();
            data_start = txb.data_start();
            let start = data_start + eth.len();
            let (head, tail) = txb.parts();
            assert_eq!(tail.len(), tails);
            let (head_len, tail_bufs, last_tail_len) = scatter(&body, head, start, tail);
            assert_eq!(
                tail_bufs, tails,
                "tail_chunks_for counts what the packet needs"
            );
            head[start - eth.len()..start].copy_from_slice(&eth);
            txb.queue(Emitted {
                offset: start - eth.len(),
                head_len: head_len + eth.len(),
                tail_bufs,
                last_tail_len,
            })
            .unwrap();
            expected.push([&eth[..], &body.concat()].concat());
        }
        assert_eq!(out.queued(), RANGES.len());
        (out.data_per_chunk(), data_start)
    };
    assert_eq!(data_start, 24, "the tx metadata room");
    assert_eq!(tail_chunk, 4096 - 24);
    let acc = xsk.accounting();
    assert!(acc.is_balanced(), "{acc:?}");
    assert_eq!(
        acc.tx - before.tx,
        7,
        "five packets, two of them with a tail chunk"
    );
    xsk.flush().unwrap();

    assert_arrived(&capture.join().unwrap(), &expected, "packet");

    // Refusals take nothing.
    let before = xsk.accounting();
    assert!(matches!(
        xsk.emit_from(&mut batch, 99, b),
        Err(EmitError::NoSuchPacket)
    ));
    assert!(matches!(
        xsk.emit_from(&mut batch, i, SocketId(9)),
        Err(EmitError::NoSuchSocket)
    ));
    {
        let (_, mut out) = xsk.emit_from(&mut batch, i, b).unwrap();
        assert!(matches!(
            out.buffers(MAX_SEGMENTS),
            Err(SendError::TooLarge)
        ));
        // Buffers dropped without queueing go back.
        let txb = out.buffers(MAX_SEGMENTS - 1).unwrap();
        drop(txb);
        let bad = out.buffers(1).unwrap();
        assert!(
            bad.queue(Emitted {
                offset: 0,
                head_len: 60,
                ..Emitted::default()
            })
            .is_err()
        );
        assert_eq!(out.queued(), 0);
    }
    assert_eq!(xsk.accounting(), before, "refused requests take nothing");

    // A full tx queue stops an emission: 1024 descriptors fit (the tx ring's size), no more.
    let flood = ethernet(pair.pods[1].mac, pair.pods[1].host_mac, FLOOD);
    let queued = {
        let (_, mut out) = xsk.emit_from(&mut batch, i, b).unwrap();
        let stop = loop {
            let mut txb = match out.buffers(0) {
                Ok(txb) => txb,
                Err(e) => break e,
            };
            let start = txb.data_start();
            let (head, _) = txb.parts();
            head[start..start + 14].copy_from_slice(&flood);
            txb.queue(Emitted {
                offset: start,
                head_len: 60,
                ..Emitted::default()
            })
            .unwrap();
        };
        assert_eq!(stop, SendError::QueueFull);
        out.queued()
    };
    assert_eq!(queued, 1024);
    let stats = xsk.stats(b).unwrap();
    assert_eq!(stats.tx_emitted, 5 + 1024);
    assert!(stats.tx_queue_full >= 1);
    assert!(xsk.accounting().is_balanced());

    // An exhausted free list stops an emission too: lend all but 5 free chunks away, ask for 18.
    xsk.flush().unwrap();
    let mut lent = Vec::new();
    while xsk.accounting().free > 5 {
        lent.push(xsk.lend().unwrap());
    }
    let before = xsk.accounting();
    {
        let (_, mut out) = xsk.emit_from(&mut batch, i, b).unwrap();
        assert!(matches!(
            out.buffers(MAX_SEGMENTS - 1),
            Err(SendError::NoFreeChunks)
        ));
        drop(out.buffers(4).unwrap());
    }
    assert_eq!(xsk.accounting(), before, "refused requests take nothing");
    for c in lent {
        xsk.reclaim(c).unwrap();
    }

    // The source was never forwarded: it goes back with the batch.
    xsk.complete(&mut batch).unwrap();
    xsk.flush().unwrap();
    let acc = pair.node.quiesce_and_audit(xsk, &pair.sockets);
    assert_eq!(acc.held, 0);
    let kernel = xsk.kernel_stats(b).unwrap();
    eprintln!("stats {:?}, kernel {kernel:?}", xsk.stats(b).unwrap());
    assert_eq!(kernel.tx_invalid_descs, 0);
    drop(pair.xsk);
    pair.node.cleanup();
}
