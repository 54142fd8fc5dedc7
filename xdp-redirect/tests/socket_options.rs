//! Socket options: busy polling applies, zero-copy on a driver without it
//! fails with a clear error, sockets on one UMEM close cleanly, a failed open
//! leaves the UMEM usable and sockets reopen after all closed; the copy-mode
//! transmit budget (`XDP_MAX_TX_SKB_BUDGET`, Linux 6.17+) is set and one kick
//! then sends more than the kernel's default 32 frames.

mod common;

use std::time::Duration;

use common::*;
use sluice_xdp::{BindMode, BusyPoll, TxSkbBudget, Xsk, XskConfig, XskError};

fn small() -> XskConfig {
    XskConfig {
        frame_count: 128,
        fill_size: 64,
        comp_size: 64,
        rx_size: 64,
        tx_size: 64,
        ..XskConfig::default()
    }
}

#[test]
fn busy_poll_and_bind_modes() {
    if !require_root("busy_poll_and_bind_modes") {
        return;
    }
    let ns = NetNs::new(format!("slx-opt-{}", std::process::id()));
    ns.enter();

    let mut xsk = Xsk::new(&XskConfig {
        busy_poll: Some(BusyPoll {
            usecs: 20,
            budget: 64,
        }),
        ..small()
    })
    .unwrap();
    let s = xsk.open_socket("lo", 0).unwrap();
    xsk.poll_kernel(s).unwrap();
    assert_eq!(xsk.binding(s).unwrap(), ("lo", 0));
    assert_eq!(xsk.accounting().fill, 64, "fill ring filled on open");
    xsk.close_socket(s).unwrap();
    assert_eq!(xsk.audit_quiescent().unwrap().free, 128);
    assert!(matches!(
        xsk.close_socket(s),
        Err(XskError::NoSuchSocket(_))
    ));

    let mut zc = Xsk::new(&XskConfig {
        bind_mode: BindMode::ZeroCopy,
        ..small()
    })
    .unwrap();
    match zc.open_socket("lo", 0) {
        Err(
            e @ XskError::Socket {
                mode: BindMode::ZeroCopy,
                ..
            },
        ) => {
            let msg = e.to_string();
            assert!(msg.contains("lo") && msg.contains("ZeroCopy"), "{msg}");
        }
        other => panic!("zero-copy on lo should fail, got {other:?}"),
    }
    match zc.open_socket("slx-nonexistent", 0) {
        Err(XskError::Socket { ifname, .. }) => assert_eq!(ifname, "slx-nonexistent"),
        other => panic!("{other:?}"),
    }
}

/// Frames queued at once in the budget test (all fit the tx ring).
const BURST: u64 = 256;

/// Sends `BURST` copies of a small frame into the pod behind `host_if` through a socket with
/// `budget`; returns the socket's budget as the kernel took it, the kicks the burst needed and
/// how many frames the pod's eth0 received.
fn burst(host_if: &str, pod: &NetNs, budget: Option<u32>) -> (TxSkbBudget, u64, u64) {
    let mut xsk = Xsk::new(&XskConfig {
        frame_count: 1024,
        fill_size: 64,
        comp_size: 512,
        rx_size: 64,
        tx_size: 512,
        tx_skb_budget: budget,
        ..XskConfig::default()
    })
    .unwrap();
    // Transmit only: nothing in the fill ring.
    let s = xsk.open_socket_with(host_if, 0, 0).unwrap();
    let rx = |ns: &NetNs| -> u64 {
        ns.exec(&["cat", "/sys/class/net/eth0/statistics/rx_packets"])
            .trim()
            .parse()
            .unwrap()
    };
    let before = rx(pod);
    let frame = ipv4_frame([10, 244, 9, 2], 17, 9, 18);
    for _ in 0..BURST {
        xsk.send_copy(s, &[&frame]).unwrap();
    }
    for _ in 0..200 {
        xsk.flush().unwrap();
        if xsk.accounting().tx == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let stats = xsk.stats(s).unwrap();
    assert_eq!(stats.tx_packets, BURST, "{stats:?}");
    assert_eq!(
        stats.tx_completed, BURST,
        "every frame completed: {stats:?}"
    );
    assert_eq!(xsk.kernel_stats(s).unwrap().tx_invalid_descs, 0);
    std::thread::sleep(Duration::from_millis(50));
    let received = rx(pod) - before;
    (xsk.tx_skb_budget(s).unwrap(), stats.tx_kicks, received)
}

#[test]
fn tx_skb_budget_is_set_and_one_kick_sends_more() {
    if !require_root("tx_skb_budget_is_set_and_one_kick_sends_more") {
        return;
    }
    // One pod per burst: the kernel frees the queue of a closed socket in deferred work, so the
    // same queue could answer EBUSY for a few milliseconds.
    let pid = std::process::id();
    let pods = ["a", "b"].map(|k| {
        wire_pod(
            format!("slx-bud{k}-{pid}"),
            format!("slxd{k}{pid}"),
            "10.244.9.2",
            "1500",
        )
    });
    let (default, kicks_default, rx_default) = burst(&pods[0].1.host, &pods[0].0, None);
    let (set, kicks_set, rx_set) = burst(&pods[1].1.host, &pods[1].0, Some(BURST as u32));
    eprintln!(
        "{BURST} frames: budget {default:?}: {kicks_default} kicks, {rx_default} received; \
         budget {set:?}: {kicks_set} kicks, {rx_set} received"
    );
    assert_eq!(default, TxSkbBudget::KernelDefault);
    assert_eq!(default.per_kick(), 32);
    // Linux 6.17 added the option; this machine runs 6.18.
    assert_eq!(
        set,
        TxSkbBudget::Set(BURST as u32),
        "the kernel refused XDP_MAX_TX_SKB_BUDGET"
    );
    assert_eq!(
        kicks_default,
        BURST / 32,
        "32 frames per kick without the option"
    );
    assert!(
        kicks_set < kicks_default && BURST / kicks_set > 32,
        "{kicks_set} kicks with budget {BURST}"
    );
    assert!(
        rx_default >= BURST && rx_set >= BURST,
        "the pod received every frame"
    );
}

/// Opens a socket on (`ifname`, `queue`), retrying while the kernel still holds the queue of a
/// socket closed just before (it frees a queue's buffer pool in deferred work: EBUSY until then).
/// Returns the socket and how long the queue stayed busy.
fn open_when_free(xsk: &mut Xsk, ifname: &str, queue: u32) -> (sluice_xdp::SocketId, Duration) {
    let t = std::time::Instant::now();
    loop {
        match xsk.open_socket(ifname, queue) {
            Err(XskError::Socket { source, .. })
                if source.raw_os_error() == Some(libc::EBUSY)
                    && t.elapsed() < Duration::from_secs(2) =>
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            other => return (other.unwrap(), t.elapsed()),
        }
    }
}

/// One frame out of socket `s` and back on the completion ring: exactly one completion.
fn one_frame_round_trip(xsk: &mut Xsk, s: sluice_xdp::SocketId) {
    let before = xsk.stats(s).unwrap().tx_completed;
    xsk.send_copy(s, &[&ipv4_frame([127, 0, 0, 1], 17, 9, 18)])
        .unwrap();
    for _ in 0..100 {
        xsk.flush().unwrap();
        if xsk.accounting().tx == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(xsk.stats(s).unwrap().tx_completed, before + 1);
}

#[test]
fn sockets_open_after_a_failed_open_and_after_all_closed() {
    if !require_root("sockets_open_after_a_failed_open_and_after_all_closed") {
        return;
    }
    let ns = NetNs::new(format!("slx-reo-{}", std::process::id()));
    ns.exec(&[
        "ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1",
    ]);
    ns.exec(&["ip", "link", "set", "v0", "up"]);
    ns.exec(&["ip", "link", "set", "v1", "up"]);
    ns.enter();
    // Room for three fill rings of 64 and frames in flight; completion and fill rings of
    // different sizes, so that rings mapped anew do not land where old ones were.
    let mut xsk = Xsk::new(&XskConfig {
        frame_count: 512,
        comp_size: 512,
        tx_size: 512,
        ..small()
    })
    .unwrap();

    // The first socket of the UMEM fails to bind (lo has one queue): nothing of it stays, and the
    // next open starts clean (libxdp 1.6.0 left the UMEM's rings unmapped but in use here).
    match xsk.open_socket("lo", 5) {
        Err(XskError::Socket {
            queue: 5, source, ..
        }) => {
            assert_eq!(source.raw_os_error(), Some(libc::EINVAL), "{source}")
        }
        other => panic!("queue 5 of lo should not bind: {other:?}"),
    }
    let lo = xsk.open_socket("lo", 0).unwrap();
    one_frame_round_trip(&mut xsk, lo);
    assert_eq!(xsk.audit_quiescent().unwrap().fill, 64);
    match xsk.open_socket("lo", 0) {
        Err(e @ XskError::Socket { .. }) => assert!(e.to_string().contains("already"), "{e}"),
        other => panic!("a second socket on lo 0: {other:?}"),
    }

    // Sockets sharing the UMEM outlive the one it was registered on.
    let v0 = xsk.open_socket("v0", 0).unwrap();
    xsk.close_socket(lo).unwrap();
    let v1 = xsk.open_socket("v1", 0).unwrap();
    one_frame_round_trip(&mut xsk, v1);
    xsk.close_socket(v0).unwrap();
    xsk.close_socket(v1).unwrap();
    let acc = xsk.audit_quiescent().unwrap();
    assert_eq!(acc.free, acc.total, "every chunk back after closing all");

    // With every socket closed, the next open registers the UMEM again.
    let (lo, busy) = open_when_free(&mut xsk, "lo", 0);
    eprintln!("lo queue 0 busy for {busy:?} after its socket closed");
    one_frame_round_trip(&mut xsk, lo);
    assert_eq!(xsk.audit_quiescent().unwrap().fill, 64);
}
