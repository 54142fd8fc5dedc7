//! One copy across workers, through real rings: two workers (threads), each with its own UMEM.
//! Worker A has the socket on pod A's veth, worker B the one on pod B's. B lends A a stock of its
//! chunks (`Xsk::lend`); every datagram pod A sends to pod B arrives at A, which writes it
//! straight from its own UMEM into B's lent chunks (`LentFrame::write`, room in front for a VXLAN
//! push) and hands the frame over; B adopts it into a batch as if received (`Xsk::adopt`),
//! rewrites its MACs through `Xsk::frames` and forwards it to pod B, whose socket receives every
//! datagram intact. Refusals hand the frame back: adopting or reclaiming at the wrong UMEM, an
//! unwritten frame (reclaimed instead). At the end A returns its stock but drops one chunk, as a
//! dying peer would: B's accounting keeps it `lent` for good and its audit says so; A's balances.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use sluice_xdp::xsk::{MAX_SEGMENTS, VXLAN_ENCAP_LEN};
use sluice_xdp::{
    LentChunk, LentFrame, LentRefusal, SocketId, Verdict, WriteError, Xsk, XskConfig,
};

const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 13, 2);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 13, 3);
const PORT: u16 = 5001;
/// Datagram payloads pod A sends: single and multi-chunk frames.
const SIZES: [usize; 5] = [100, 1400, 8000, 3000, 18];
/// Chunks B keeps lent to A.
const STOCK: usize = 16;

fn worker_xsk() -> Xsk {
    Xsk::new(&XskConfig {
        frame_count: 512,
        fill_size: 128,
        comp_size: 128,
        rx_size: 128,
        tx_size: 128,
        ..XskConfig::default()
    })
    .unwrap()
}

/// What worker B reports when A hangs up.
struct WorkerB {
    xsk: Xsk,
    adopted: usize,
    reclaimed: usize,
}

/// Worker B: lends A `STOCK` chunks, then adopts the frames A hands back, rewrites their MACs to
/// `macs` and forwards them on `b`, lending a chunk for each chunk taken back; unwritten frames
/// are reclaimed. Returns when A hangs up.
fn worker_b(
    mut xsk: Xsk,
    b: SocketId,
    macs: ([u8; 6], [u8; 6]),
    stock: mpsc::Sender<LentChunk>,
    frames: mpsc::Receiver<LentFrame>,
) -> WorkerB {
    let mut batch = xsk.batch();
    let (mut adopted, mut reclaimed) = (0, 0);
    let lend = |xsk: &mut Xsk, n: usize| {
        for _ in 0..n {
            stock
                .send(xsk.lend().expect("a free chunk to lend"))
                .unwrap();
        }
    };
    lend(&mut xsk, STOCK);
    let data_start = 24 + VXLAN_ENCAP_LEN as usize;
    loop {
        let first = match frames.recv_timeout(Duration::from_millis(5)) {
            Ok(f) => Some(f),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let received = xsk.recv(b, &mut batch).unwrap();
        for frame in first.into_iter().chain(frames.try_iter()) {
            let chunks = frame.chunks();
            match xsk.adopt(frame, &mut batch) {
                Ok(()) => {
                    adopted += 1;
                    lend(&mut xsk, chunks);
                }
                Err(e) if e.reason == LentRefusal::NotWritten => {
                    reclaimed += xsk.reclaim(e.frame).unwrap();
                }
                Err(e) => panic!("adopt: {e}: {:?}", e.reason),
            }
        }
        let mut windows = Vec::new();
        for (k, f) in xsk.frames(&mut batch).enumerate().skip(received) {
            let (chunk, off, len, _) = f.into_parts();
            assert_eq!(
                off, data_start,
                "adopted data behind the metadata room and the headroom"
            );
            chunk[off..off + 6].copy_from_slice(&macs.0);
            chunk[off + 6..off + 12].copy_from_slice(&macs.1);
            windows.push((k, off, len));
        }
        for (k, off, len) in windows {
            // A VXLAN header fits in front.
            let push = VXLAN_ENCAP_LEN as usize;
            batch.set_bounds(k, off - push, len + push).unwrap();
            batch.set_bounds(k, off, len).unwrap();
            batch.set_verdict(k, Verdict::Forward(b));
        }
        xsk.complete(&mut batch).unwrap();
        xsk.flush().unwrap();
    }
    WorkerB {
        xsk,
        adopted,
        reclaimed,
    }
}

/// Worker A's part for one received packet: writes its bytes into lent chunks taken from
/// `stock` as needed, with room for a VXLAN push in front.
fn write_lent(parts: &[&[u8]], stock: &mpsc::Receiver<LentChunk>) -> LentFrame {
    let mut lent = LentFrame::new();
    loop {
        match lent.write(VXLAN_ENCAP_LEN as usize, parts) {
            Ok(()) => return lent,
            Err(WriteError::NeedChunks { need }) => {
                while lent.chunks() < need {
                    let c = stock.recv_timeout(Duration::from_secs(2)).expect("stock");
                    lent.push(c).unwrap();
                }
            }
            Err(e) => panic!("write: {e}"),
        }
    }
}

/// Lets a worker's tx complete, then audits it (its sockets already out of the XSKMAP).
fn settle_and_audit(xsk: &mut Xsk, s: SocketId) -> Result<sluice_xdp::FrameAccounting, String> {
    let mut late = xsk.batch();
    for _ in 0..200 {
        xsk.recv(s, &mut late).unwrap();
        xsk.complete(&mut late).unwrap();
        xsk.flush().unwrap();
        if xsk.accounting().tx == 0 {
            break;
        }
        thread::sleep(Duration::from_millis(5));
    }
    xsk.audit_quiescent()
}

#[test]
fn frames_cross_workers_with_one_copy_into_lent_chunks() {
    if !require_root("frames_cross_workers_with_one_copy_into_lent_chunks") {
        return;
    }
    let pid = std::process::id();
    let [pa, pb] = [("A", "a", POD_A), ("B", "b", POD_B)].map(|(ns, host, ip)| {
        pod(
            format!("slx-ln{ns}-{pid}"),
            format!("slxln{host}{pid}"),
            ip,
            "9000",
            false,
        )
    });
    let mut node = classifier_on_pods(format!("slx-ln-{pid}"), &[&pa.veth.host, &pb.veth.host]);
    let (mut xsk_a, mut xsk_b) = (worker_xsk(), worker_xsk());
    let a = xsk_a.open_socket(&pa.veth.host, 0).unwrap();
    let b = xsk_b.open_socket(&pb.veth.host, 0).unwrap();
    for (ifindex, fd) in node
        .ifindexes
        .iter()
        .zip([xsk_a.fd(a).unwrap(), xsk_b.fd(b).unwrap()])
    {
        node.loader.register_socket(*ifindex, 0, fd).unwrap();
    }

    let (stock_tx, stock) = mpsc::channel::<LentChunk>();
    let (frames, frames_rx) = mpsc::channel::<LentFrame>();
    let macs = (pb.mac, pb.host_mac);
    let b_thread = thread::spawn(move || worker_b(xsk_b, b, macs, stock_tx, frames_rx));

    let sink = udp_sink(
        &pb.ns.name,
        SocketAddrV4::new(POD_B, PORT),
        Duration::from_secs(1),
    );
    let payloads: Vec<Vec<u8>> = SIZES
        .iter()
        .enumerate()
        .map(|(k, &n)| pattern(n, k as u8))
        .collect();
    let to_send = payloads.clone();
    let sender = in_ns(&pa.ns.name, move || {
        let sock = std::net::UdpSocket::bind(SocketAddrV4::new(POD_A, 0)).unwrap();
        for p in to_send {
            sock.send_to(&p, SocketAddrV4::new(POD_B, PORT)).unwrap();
            thread::sleep(Duration::from_millis(5));
        }
    });

    // Worker A: every packet from pod A goes to worker B as a frame in B's chunks.
    let mut batch = xsk_a.batch();
    let (mut handed, mut multi) = (0, 0);
    let until = Instant::now() + Duration::from_secs(5);
    while handed < SIZES.len() && Instant::now() < until {
        let n = xsk_a.recv(a, &mut batch).unwrap();
        for i in 0..n {
            let f = xsk_a.frame(&mut batch, i).unwrap();
            let mut parts: [&[u8]; MAX_SEGMENTS] = [&[]; MAX_SEGMENTS];
            parts[0] = f.data();
            for k in 0..f.continuations() {
                parts[1 + k] = f.continuation(k);
            }
            let mut lent = write_lent(&parts[..1 + f.continuations()], &stock);
            multi += usize::from(lent.chunks() > 1);
            if handed == 0 {
                // Only the lender takes a frame back.
                let e = xsk_a.adopt(lent, &mut batch).unwrap_err();
                assert_eq!(e.reason, LentRefusal::Foreign);
                lent = e.frame;
                assert_eq!(
                    xsk_a.accounting().held as usize,
                    batch.len(),
                    "nothing adopted"
                );
            }
            frames.send(lent).unwrap();
            handed += 1;
        }
        // The originals are dropped: the copy in B's chunks is what leaves.
        xsk_a.complete(&mut batch).unwrap();
        xsk_a.flush().unwrap();
        thread::sleep(Duration::from_millis(1));
    }
    sender.join().unwrap();
    assert_eq!(handed, SIZES.len(), "every datagram reached worker A");
    assert!(multi > 0, "a frame spanning several lent chunks");

    assert_arrived(&sink.join().unwrap(), &payloads, "datagram");

    // A gives its stock back: a chunk reclaimed by the wrong UMEM comes back; one is dropped
    // (a dying peer), the others return as unwritten frames, which B reclaims.
    let mut returned: Vec<LentChunk> = stock.try_iter().collect();
    assert_eq!(returned.len(), STOCK);
    let e = xsk_a.reclaim(returned.pop().unwrap()).unwrap_err();
    assert_eq!(e.reason, LentRefusal::Foreign);
    let mut back = e.frame;
    returned.push(back.pop().unwrap());
    let dropped = returned.pop();
    drop(dropped);
    for c in returned {
        frames.send(c.into()).unwrap();
    }
    drop(frames);
    let WorkerB {
        xsk: mut xsk_b,
        adopted,
        reclaimed,
    } = b_thread.join().unwrap();
    assert_eq!((adopted, reclaimed), (SIZES.len(), STOCK - 1));
    let stats_b = xsk_b.stats(b).unwrap();
    eprintln!("worker B: {stats_b:?}");
    assert_eq!(stats_b.tx_packets, SIZES.len() as u64);

    for ifindex in &node.ifindexes {
        node.loader.unregister_socket(*ifindex, 0).unwrap();
    }
    let acc_a = settle_and_audit(&mut xsk_a, a).unwrap();
    eprintln!("worker A: {acc_a:?}");
    assert_eq!(acc_a.lent, 0);
    let err = settle_and_audit(&mut xsk_b, b).unwrap_err();
    let acc_b = xsk_b.accounting();
    eprintln!("worker B: {acc_b:?}: {err}");
    assert!(acc_b.is_balanced(), "{acc_b:?}");
    assert_eq!((acc_b.lent, acc_b.lent_dropped), (1, 1));
    assert!(err.contains("dropped"), "{err}");
    // Nothing else is missing: the dropped chunk is the only one not free or in a fill ring.
    assert_eq!(acc_b.free + acc_b.fill + 1, acc_b.total);

    drop((xsk_a, xsk_b));
    node.cleanup();
}
