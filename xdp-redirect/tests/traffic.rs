//! Real traffic: two pods (netns) with veth pairs, the XDP program on both
//! host ends, AF_XDP sockets on both sharing one UMEM, and a forwarding loop
//! moving frames between them. ping, UDP (small and ~8000 bytes, chained
//! descriptors) and TCP cross. A to B goes through the whole-batch path
//! (`Xsk::frames`: every frame of a batch alive at once, bounds and verdicts
//! set by index afterwards), B to A one frame at a time (`Xsk::frame`); both
//! move every frame 50 bytes to the front of its chunk, as a VXLAN push
//! would. Every other frame from B to A leaves as a copy (`Xsk::send_copy`,
//! chained when large), so the echoes also check copied bytes; afterwards
//! every frame is accounted for.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use common::*;
use sluice_xdp::{FrameMut, RxBatch, SocketId, Verdict, Xsk};

const MTU: &str = "9000";
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 7, 2);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 7, 3);

#[derive(Debug, Default)]
struct ForwardReport {
    packets: u64,
    multi_buffer: u64,
    max_len: usize,
    max_segments: usize,
    first_offsets: Vec<usize>,
    cont_offsets: Vec<usize>,
    copied: u64,
    copied_chained: u64,
    /// Packets that went through `Xsk::frames` (A to B), and of those multi-buffer.
    batch_packets: u64,
    batch_multi_buffer: u64,
    /// Most packets of one batch lent at once.
    batch_max_alive: usize,
}

/// How far every forwarded frame moves to the front of its chunk.
const SHIFT: usize = 50;

/// A to B: the whole batch at once through `Xsk::frames`, as the agent's
/// `process_batch` takes it. Every frame stays alive until all are processed
/// (their first chunks must be distinct); each moves `SHIFT` bytes to the
/// front and gets B's MACs; then the batch gets the new bounds and the
/// verdicts by index.
fn forward_whole_batch(
    xsk: &Xsk,
    batch: &mut RxBatch,
    to: SocketId,
    (dmac, smac): ([u8; 6], [u8; 6]),
    rep: &mut ForwardReport,
) {
    let n = batch.len();
    let mut windows: Vec<Option<(usize, usize)>> = vec![None; n];
    {
        let frames = xsk.frames(batch);
        assert_eq!(frames.len(), n, "one frame per packet");
        let mut parts: Vec<_> = frames.map(FrameMut::into_parts).collect();
        let mut chunks: Vec<usize> = parts.iter().map(|(c, ..)| c.as_ptr() as usize).collect();
        chunks.sort_unstable();
        chunks.dedup();
        assert_eq!(chunks.len(), n, "the frames of a batch are distinct chunks");
        rep.batch_max_alive = rep.batch_max_alive.max(n);
        for (k, (chunk, off, len, conts)) in parts.iter_mut().enumerate() {
            let (off, len) = (*off, *len);
            rep.batch_packets += 1;
            let tail: usize = conts.clone().map(<[u8]>::len).sum();
            assert_eq!(conts.len(), conts.count(), "exact size");
            if tail > 0 {
                rep.batch_multi_buffer += 1;
            }
            rep.max_len = rep.max_len.max(len + tail);
            if !rep.first_offsets.contains(&off) {
                rep.first_offsets.push(off);
            }
            if len < 14 || off < SHIFT {
                continue; // stays Drop
            }
            chunk.copy_within(off..off + len, off - SHIFT);
            let d = &mut chunk[off - SHIFT..];
            d[0..6].copy_from_slice(&dmac);
            d[6..12].copy_from_slice(&smac);
            windows[k] = Some((off - SHIFT, len));
        }
    }
    for (k, window) in windows.into_iter().enumerate() {
        if let Some((off, len)) = window {
            batch.set_bounds(k, off, len).unwrap();
            batch.set_verdict(k, Verdict::Forward(to));
        }
    }
}

/// The test's forwarding loop: A -> B as a whole batch
/// ([`forward_whole_batch`]); B -> A frame by frame, each moved `SHIFT` bytes
/// to the front of its chunk (as a VXLAN push would) so the kernel must
/// honour a changed data offset on tx, and every other one of them sent as a
/// copy instead (original dropped).
fn forward(
    xsk: &mut Xsk,
    a: SocketId,
    b: SocketId,
    to_b: ([u8; 6], [u8; 6]),
    to_a: ([u8; 6], [u8; 6]),
    stop: &AtomicBool,
) -> ForwardReport {
    let mut rep = ForwardReport::default();
    let mut batch = xsk.batch();
    let mut copy = Vec::with_capacity(16 * 1024);
    let chunk = xsk.config().frame_size as usize;
    let fds = [
        xsk.fd(a).unwrap().as_raw_fd(),
        xsk.fd(b).unwrap().as_raw_fd(),
    ];
    while !stop.load(Ordering::Relaxed) {
        let mut pfds = fds.map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: `pfds` is a live array of two pollfd structs.
        unsafe { libc::poll(pfds.as_mut_ptr(), 2, 5) };
        let n = xsk.recv(a, &mut batch).unwrap();
        rep.packets += n as u64;
        forward_whole_batch(xsk, &mut batch, b, to_b, &mut rep);
        xsk.complete(&mut batch).unwrap();
        // B to A, frame by frame.
        {
            let (to, (dmac, smac)) = (a, to_a);
            let n = xsk.recv(b, &mut batch).unwrap();
            for i in 0..n {
                let mut f = xsk.frame(&mut batch, i).unwrap();
                rep.packets += 1;
                let as_copy = rep.packets % 2 == 0 && f.len() >= 14;
                rep.max_len = rep.max_len.max(f.total_len());
                rep.max_segments = rep.max_segments.max(1 + f.continuations());
                if !rep.first_offsets.contains(&f.offset()) {
                    rep.first_offsets.push(f.offset());
                }
                if f.continuations() > 0 {
                    rep.multi_buffer += 1;
                    // split_tail lends the same continuation bytes as continuation(k), in order,
                    // next to the mutable first chunk.
                    let conts: Vec<Vec<u8>> = (0..f.continuations())
                        .map(|k| f.continuation(k).to_vec())
                        .collect();
                    let mut tail: [&[u8]; 32] = [&[]; 32];
                    let (chunk, n) = f.split_tail(&mut tail);
                    assert_eq!(chunk.len(), 4096);
                    assert_eq!(n, conts.len());
                    assert!(
                        tail[..n]
                            .iter()
                            .zip(&conts)
                            .all(|(a, b)| *a == b.as_slice())
                    );
                    for k in 0..f.continuations() {
                        if !rep.cont_offsets.contains(&f.continuation_offset(k)) {
                            rep.cont_offsets.push(f.continuation_offset(k));
                        }
                    }
                }
                if f.len() < 14 {
                    f.drop_frame();
                    continue;
                }
                let (off, len) = (f.offset(), f.len());
                f.chunk().copy_within(off..off + len, off - SHIFT);
                f.set_bounds(off - SHIFT, len).unwrap();
                let d = f.data_mut();
                d[0..6].copy_from_slice(&dmac);
                d[6..12].copy_from_slice(&smac);
                if !as_copy {
                    f.forward(to);
                    continue;
                }
                copy.clear();
                copy.extend_from_slice(f.data());
                for k in 0..f.continuations() {
                    copy.extend_from_slice(f.continuation(k));
                }
                f.drop_frame();
                // The frame's borrow of the UMEM ends here.
                xsk.send_copy(to, &[&copy]).unwrap();
                rep.copied += 1;
                if copy.len() > chunk {
                    rep.copied_chained += 1;
                }
            }
            xsk.complete(&mut batch).unwrap();
        }
        xsk.flush().unwrap();
    }
    rep
}

#[test]
fn pods_talk_through_af_xdp_sockets_sharing_one_umem() {
    if !require_root("pods_talk_through_af_xdp_sockets_sharing_one_umem") {
        return;
    }
    let pair = pod_pair("t", [POD_A, POD_B], MTU, false);
    let PodPair {
        pods: [pa, pb],
        mut node,
        mut xsk,
        sockets: [sa, sb],
    } = pair;
    let rx_offset = xsk.rx_offset();

    let stop = Arc::new(AtomicBool::new(false));
    let stop_fwd = stop.clone();
    let (to_b, to_a) = ((pb.mac, pb.host_mac), (pa.mac, pa.host_mac));
    let fwd = thread::spawn(move || {
        let rep = forward(&mut xsk, sa, sb, to_b, to_a, &stop_fwd);
        (xsk, rep)
    });

    // ping both ways.
    let out = pa.ns.exec(&[
        "ping",
        "-c",
        "3",
        "-i",
        "0.2",
        "-W",
        "2",
        &POD_B.to_string(),
    ]);
    assert!(out.contains("3 received"), "{out}");
    let out = pb.ns.exec(&[
        "ping",
        "-c",
        "2",
        "-i",
        "0.2",
        "-W",
        "2",
        "-s",
        "3000",
        &POD_A.to_string(),
    ]);
    assert!(out.contains("2 received"), "{out}");

    // UDP echo: a small datagram and one of 8000 bytes (chained descriptors).
    let udp_server = in_ns(&pb.ns.name, || {
        let s = UdpSocket::bind(SocketAddrV4::new(POD_B, 7000)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        for _ in 0..2 {
            let (n, peer) = s.recv_from(&mut buf).unwrap();
            got.push(n);
            s.send_to(&buf[..n], peer).unwrap();
        }
        got
    });
    thread::sleep(Duration::from_millis(100));
    let udp_client = in_ns(&pa.ns.name, || {
        let s = UdpSocket::bind(SocketAddrV4::new(POD_A, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = vec![0u8; 65536];
        let mut echoed = Vec::new();
        for (len, seed) in [(100usize, 1u8), (8000, 2)] {
            let msg = pattern(len, seed);
            s.send_to(&msg, SocketAddrV4::new(POD_B, 7000)).unwrap();
            let n = s.recv(&mut buf).unwrap();
            echoed.push(buf[..n] == msg[..]);
        }
        echoed
    });
    assert_eq!(
        udp_client.join().unwrap(),
        vec![true, true],
        "UDP echoes intact"
    );
    assert_eq!(
        udp_server.join().unwrap(),
        vec![100, 8000],
        "UDP sizes at the server"
    );

    // TCP: 2 MiB each way.
    const TCP_LEN: usize = 2 << 20;
    let tcp_server = in_ns(&pb.ns.name, || {
        let l = TcpListener::bind(SocketAddrV4::new(POD_B, 7001)).unwrap();
        let (mut c, _) = l.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut data = Vec::new();
        c.read_to_end(&mut data).unwrap();
        c.write_all(&data).unwrap();
        data.len()
    });
    thread::sleep(Duration::from_millis(100));
    let tcp_client = in_ns(&pa.ns.name, || {
        let mut c = TcpStream::connect(SocketAddrV4::new(POD_B, 7001)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let msg = pattern(TCP_LEN, 7);
        c.write_all(&msg).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).unwrap();
        back == msg
    });
    assert!(tcp_client.join().unwrap(), "TCP echo intact");
    assert_eq!(
        tcp_server.join().unwrap(),
        TCP_LEN,
        "TCP bytes at the server"
    );

    stop.store(true, Ordering::Relaxed);
    let (mut xsk, rep) = fwd.join().unwrap();
    eprintln!("forwarder: {rep:?}");
    eprintln!("socket A: {:?}", xsk.stats(sa).unwrap());
    eprintln!("socket B: {:?}", xsk.stats(sb).unwrap());
    eprintln!("classifier: {:?}", node.loader.counters().unwrap());
    assert!(
        rep.multi_buffer > 0,
        "no frame arrived as chained descriptors"
    );
    assert!(rep.max_len >= 8000 + 42, "largest frame {}", rep.max_len);
    assert!(rep.copied_chained > 0, "no copy spanned several chunks");
    assert!(rep.batch_packets > 0, "nothing went through Xsk::frames");
    assert!(
        rep.batch_multi_buffer > 0,
        "no multi-buffer frame went through Xsk::frames"
    );
    assert_eq!(xsk.stats(sa).unwrap().tx_copied, rep.copied);
    assert!(
        rep.first_offsets.iter().all(|o| *o == rx_offset),
        "rx offsets {:?}",
        rep.first_offsets
    );

    node.quiesce_and_audit(&mut xsk, &[sa, sb]);

    drop(xsk);
    node.cleanup();
}
