//! Frame accounting under pressure: a pod floods UDP of mixed sizes (single
//! and multi-buffer) into a small UMEM; the loop drops some, moves the data
//! offset of some, copies some and sends the rest back out through a tx ring
//! too small for the load (queue-full drops). Every other batch goes through
//! the whole-batch path (`Xsk::frames`, bounds and verdicts by index). The
//! accounting balances after every batch; at the end every chunk is found
//! exactly once, and closing the socket gives every chunk back.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use common::*;
use sluice_xdp::{BoundsError, RxBatch, SocketId, Verdict, Xsk, XskConfig};

/// One batch through `Xsk::frames`: every frame lent at once; packet `k` is
/// copied out (into `copies`, sent once the frames are gone) and dropped,
/// moved 50 bytes to the front of its chunk and forwarded, or forwarded as it
/// is, by `(seen + k) % 3`; bounds and verdicts then by index. Returns the
/// multi-buffer packets.
fn whole_batch(
    xsk: &Xsk,
    batch: &mut RxBatch,
    s: SocketId,
    seen: u64,
    copies: &mut Vec<Vec<u8>>,
) -> u64 {
    let mut moved = [None; 32];
    let mut multi = 0;
    let n = batch.len();
    for (k, f) in xsk.frames(batch).enumerate() {
        let total = f.total_len();
        let (chunk, off, len, conts) = f.into_parts();
        assert_eq!(len + conts.clone().map(<[u8]>::len).sum::<usize>(), total);
        if conts.len() > 0 {
            multi += 1;
        }
        match (seen + k as u64) % 3 {
            0 => copies.push(
                std::iter::once(&chunk[off..off + len])
                    .chain(conts)
                    .flatten()
                    .copied()
                    .collect(),
            ),
            1 => {
                chunk.copy_within(off..off + len, off - 50);
                moved[k] = Some((off - 50, len, chunk.len()));
            }
            _ => {}
        }
    }
    for (k, moved) in moved.into_iter().enumerate().take(n) {
        let verdict = match ((seen + k as u64) % 3, moved) {
            (0, _) => Verdict::Drop,
            (_, Some((off, len, chunk_len))) => {
                assert_eq!(
                    batch.set_bounds(k, off, chunk_len),
                    Err(BoundsError::OutOfChunk)
                );
                batch.set_bounds(k, off, len).unwrap();
                Verdict::Forward(s)
            }
            _ => Verdict::Forward(s),
        };
        batch.set_verdict(k, verdict);
    }
    assert_eq!(batch.set_bounds(n, 0, 1), Err(BoundsError::NoSuchPacket));
    multi
}

#[test]
fn every_frame_is_accounted_for() {
    if !require_root("every_frame_is_accounted_for") {
        return;
    }
    let pid = std::process::id();
    let (ns, veth, _) = wire_pod(
        format!("slx-acc-{pid}"),
        format!("slxc{pid}"),
        "10.244.8.2",
        "9000",
    );

    let mut node = classifier_on_pods(format!("slx-acc-{pid}"), &[&veth.host]);
    let ifindex = node.ifindexes[0];

    let cfg = XskConfig {
        frame_count: 256,
        fill_size: 128,
        comp_size: 64,
        rx_size: 128,
        tx_size: 8,
        batch_size: 32,
        ..XskConfig::default()
    };
    let mut xsk = Xsk::new(&cfg).unwrap();
    // A fill target below the ring size (as a pod socket gets): the fill ring never holds more,
    // and the frames still all come back.
    let s = xsk.open_socket_with(&veth.host, 0, 96).unwrap();
    assert_eq!(xsk.accounting().fill, 96);
    node.loader
        .register_socket(ifindex, 0, xsk.fd(s).unwrap())
        .unwrap();
    let fd = xsk.fd(s).unwrap().as_raw_fd();

    const SENT: usize = 3000;
    let path = format!("/run/netns/{}", ns.name);
    let sender = std::thread::spawn(move || {
        let f = std::fs::File::open(path).unwrap();
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::new(10, 244, 8, 2), 0)).unwrap();
        let buf = vec![0x5au8; 8000];
        for i in 0..SENT {
            let len = [18, 700, 1400, 4000, 8000][i % 5];
            // ENOBUFS under load is fine: the point is pressure.
            let _ = sock.send_to(
                &buf[..len],
                SocketAddrV4::new(Ipv4Addr::new(10, 244, 8, 99), 9),
            );
            // Bursts of 20, so that a busy machine still lets the receiver see a good share
            // (unpaced, an empty fill ring dropped all but a few dozen now and then).
            if i % 20 == 19 {
                std::thread::sleep(Duration::from_micros(500));
            }
        }
    });

    let mut batch = xsk.batch();
    let (mut seen, mut multi, mut k) = (0u64, 0u64, 0u64);
    let (mut copied, mut copy_refused, mut copied_chained) = (0u64, 0u64, 0u64);
    // Frames to send as copies once a batch's frames are gone (`send_copy` needs the UMEM
    // mutably); their original chunks are still held by the batch: the copies take others.
    let mut copies: Vec<Vec<u8>> = Vec::new();
    let mut quiet_since = Instant::now();
    let (mut rounds, mut batches, mut batched) = (0u64, 0u64, 0u64);
    loop {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        unsafe { libc::poll(&mut pfd, 1, 5) };
        let n = xsk.recv(s, &mut batch).unwrap();
        rounds += 1;
        batches += u64::from(n > 0);
        if batches % 2 == 1 {
            multi += whole_batch(&xsk, &mut batch, s, seen, &mut copies);
            seen += n as u64;
            batched += n as u64;
        }
        for i in (0..n).filter(|_| batches % 2 == 0) {
            let mut f = xsk.frame(&mut batch, i).unwrap();
            seen += 1;
            k += 1;
            if f.continuations() > 0 {
                multi += 1;
            }
            match k % 4 {
                0 => f.drop_frame(),
                1 => {
                    let (off, len) = (f.offset(), f.len());
                    f.chunk().copy_within(off..off + len, off - 50);
                    f.set_bounds(off - 50, len).unwrap();
                    let chunk_len = f.chunk().len();
                    assert!(
                        f.set_bounds(off, chunk_len).is_err(),
                        "bounds past the chunk"
                    );
                    assert_eq!(
                        (f.offset(), f.len()),
                        (off - 50, len),
                        "refused bounds keep the old"
                    );
                    f.forward(s);
                }
                2 => f.forward(s),
                _ => {
                    let mut copy = f.data().to_vec();
                    for c in 0..f.continuations() {
                        copy.extend_from_slice(f.continuation(c));
                    }
                    assert_eq!(copy.len(), f.total_len());
                    copies.push(copy);
                    f.drop_frame();
                }
            }
        }
        for copy in copies.drain(..) {
            let (head, tail) = copy.split_at(copy.len() / 3);
            match xsk.send_copy(s, &[head, tail]) {
                Ok(()) => {
                    copied += 1;
                    if copy.len() > cfg.frame_size as usize {
                        copied_chained += 1;
                    }
                }
                Err(_) => copy_refused += 1,
            }
            assert!(xsk.accounting().is_balanced(), "{:?}", xsk.accounting());
        }
        // Held frames are counted while the batch has them.
        assert!(xsk.accounting().is_balanced(), "{:?}", xsk.accounting());
        xsk.complete(&mut batch).unwrap();
        // Kick the tx ring only every fourth busy round: forwards pile up past the tx ring and
        // its queue, so the queue-full path runs whatever the machine's speed.
        if n == 0 || rounds.is_multiple_of(4) {
            xsk.flush().unwrap();
        }
        let acc = xsk.accounting();
        assert!(acc.is_balanced(), "{acc:?}");
        assert_eq!(acc.held, 0);
        assert!(acc.fill <= 96, "fill ring above its target: {acc:?}");
        if n > 0 {
            quiet_since = Instant::now();
        } else if sender.is_finished() && quiet_since.elapsed() > Duration::from_millis(200) {
            break;
        }
    }
    sender.join().unwrap();
    let stats = xsk.stats(s).unwrap();
    let kernel = xsk.kernel_stats(s).unwrap();
    eprintln!(
        "seen {seen} ({batched} as whole batches), multi-buffer {multi}, copied {copied} \
         ({copied_chained} chained, {copy_refused} refused), stats {stats:?}, kernel {kernel:?}"
    );
    assert!(copied_chained > 0, "no copy spanned several chunks");
    assert_eq!(stats.tx_copied, copied);
    // Every descriptor we gave the kernel (fill and tx) was valid.
    assert_eq!((kernel.rx_invalid_descs, kernel.tx_invalid_descs), (0, 0));
    assert!(seen > 100, "only {seen} frames arrived");
    assert!(batched > 0, "no batch went through Xsk::frames");
    assert!(multi > 0, "no multi-buffer frame");
    assert!(
        stats.tx_queue_full > 0,
        "tx queue never filled: the test did not press"
    );

    for _ in 0..100 {
        xsk.flush().unwrap();
        if xsk.accounting().tx == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let acc = xsk.audit_quiescent().unwrap();
    eprintln!("after the run: {acc:?}");

    node.loader.unregister_socket(ifindex, 0).unwrap();
    xsk.close_socket(s).unwrap();
    let acc = xsk.audit_quiescent().unwrap();
    eprintln!("after close: {acc:?}");
    assert_eq!(acc.free, acc.total, "all chunks back on the free list");

    drop(xsk);
    node.cleanup();
}
