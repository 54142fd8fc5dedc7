//! A burst that empties a pod socket's fill ring deepens that ring at the next flush, although the
//! worker has taken only one batch off the rx ring by then and the rest of the burst still waits
//! there (the chunks it sits in are "given, not received back", not on the fill ring). Before the
//! fill ring's own consumer index was read, a ring of two batches or more never looked drained
//! and stayed at its base: 64-byte UDP at kernel VXLAN's load lost 61 % in `scripts/bench.sh`'s
//! shared layout, nearly all of it `rx_fill_ring_empty_descs`.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::Duration;

use common::*;
use sluice_xdp::{Xsk, XskConfig};

/// `count` 64-byte UDP datagrams from the pod in netns `ns` to an address behind its host veth,
/// back to back; returns once the host side has had time to take them.
fn burst(ns: &str, count: usize) {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let f = std::fs::File::open(path).unwrap();
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::new(10, 244, 9, 2), 0)).unwrap();
        for _ in 0..count {
            sock.send_to(
                &[0x5a; 64],
                SocketAddrV4::new(Ipv4Addr::new(10, 244, 9, 99), 9),
            )
            .unwrap();
        }
    })
    .join()
    .unwrap();
    // The host veth's NAPI runs the XDP program on them, on this core or in ksoftirqd.
    std::thread::sleep(Duration::from_millis(100));
}

#[test]
fn a_burst_that_empties_the_fill_ring_deepens_it() {
    if !require_root("a_burst_that_empties_the_fill_ring_deepens_it") {
        return;
    }
    let pid = std::process::id();
    let (ns, veth, _) = wire_pod(
        format!("slx-fill-{pid}"),
        format!("slxf{pid}"),
        "10.244.9.2",
        "1500",
    );
    let mut node = classifier_on_pods(format!("slx-fill-{pid}"), &[&veth.host]);
    let ifindex = node.ifindexes[0];

    const BASE: u32 = 128;
    const BATCH: usize = 32;
    let cfg = XskConfig {
        frame_count: 2048,
        fill_size: 1024,
        rx_size: 1024,
        comp_size: 64,
        tx_size: 64,
        batch_size: BATCH,
        fill_boost: 1024,
        ..XskConfig::default()
    };
    let mut xsk = Xsk::new(&cfg).unwrap();
    let s = xsk.open_socket_with(&veth.host, 0, BASE).unwrap();
    assert_eq!(xsk.accounting().fill, u64::from(BASE));
    node.loader
        .register_socket(ifindex, 0, xsk.fd(s).unwrap())
        .unwrap();

    // Three fill rings' worth in one burst, nothing read meanwhile: the kernel fills the base's
    // chunks and drops the rest for want of one.
    const SENT: usize = 3 * BASE as usize;
    burst(&ns.name, SENT);
    let kernel = xsk.kernel_stats(s).unwrap();
    assert!(
        kernel.rx_fill_ring_empty_descs > 0,
        "the burst did not empty the fill ring: {kernel:?}"
    );

    // One round: a batch off the rx ring, the rest of the burst left there; then the flush.
    let mut batch = xsk.batch();
    let n = xsk.recv(s, &mut batch).unwrap();
    assert_eq!(n, BATCH, "one batch of the {BASE} frames waiting");
    xsk.complete(&mut batch).unwrap();
    xsk.flush().unwrap();
    let acc = xsk.accounting();
    assert!(acc.is_balanced(), "{acc:?}");
    // The ring ran dry: its target is now the whole ring (the pool allows it), and the refill
    // tops it up to that (the frames still on the rx ring count as given).
    assert_eq!(
        acc.fill,
        u64::from(cfg.fill_size),
        "the fill ring stayed at its base after running dry: {acc:?}"
    );

    // The next burst of the same size fits: nothing more is dropped.
    let mut seen = n;
    loop {
        let n = xsk.recv(s, &mut batch).unwrap();
        xsk.complete(&mut batch).unwrap();
        xsk.flush().unwrap();
        if n == 0 {
            break;
        }
        seen += n;
    }
    assert_eq!(
        seen, BASE as usize,
        "the first burst's frames that had a chunk"
    );
    let dropped = xsk.kernel_stats(s).unwrap().rx_fill_ring_empty_descs;
    burst(&ns.name, BASE as usize * 4);
    let kernel = xsk.kernel_stats(s).unwrap();
    assert_eq!(
        kernel.rx_fill_ring_empty_descs, dropped,
        "the deepened ring still ran dry: {kernel:?}"
    );

    node.loader.unregister_socket(ifindex, 0).unwrap();
    xsk.close_socket(s).unwrap();
    let acc = xsk.audit_quiescent().unwrap();
    assert_eq!(acc.free, acc.total, "all chunks back on the free list");
    drop(xsk);
    node.cleanup();
}
