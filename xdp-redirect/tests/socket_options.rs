//! Socket options: busy polling applies, zero-copy on a driver without it
//! fails with a clear error, sockets on one UMEM close cleanly.

mod common;

use common::*;
use sluice_xdp::{BindMode, BusyPoll, Xsk, XskConfig, XskError};

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
