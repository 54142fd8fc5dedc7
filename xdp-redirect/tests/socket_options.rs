//! Socket options: busy polling applies, zero-copy on a driver without it
//! fails with a clear error, sockets on one UMEM close cleanly; the copy-mode
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
