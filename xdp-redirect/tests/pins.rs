//! Pinning: load + attach + pin, drop without cleanup (a crashed agent),
//! reload finds the pinned maps and swaps the program inside the pinned
//! link, clean shutdown removes every pin and detaches.

mod common;

use common::*;
use sluice_xdp::loader::{attached_program_id, ifindex};
use sluice_xdp::{
    AttachMode, ClassifierConfig, IfaceConfig, IfaceRole, Isolation, LoaderOptions, XdpLoader,
};

fn pair(ns: &NetNs, host: String) -> Veth {
    sh_quiet(&["ip", "link", "del", &host]);
    sh(&[
        "ip", "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
    ]);
    sh(&["ip", "link", "set", &host, "up"]);
    ns.exec(&["ip", "link", "set", "eth0", "up"]);
    Veth { host }
}

fn files(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn restart_reuses_pins_and_cleanup_removes_them() {
    if !require_root("restart_reuses_pins_and_cleanup_removes_them") {
        return;
    }
    let pid = std::process::id();
    let ns = NetNs::new(format!("slx-pin-{pid}"));
    let native = pair(&ns, format!("slxp{pid}"));
    let ns2 = NetNs::new(format!("slx-pin2-{pid}"));
    let generic = pair(&ns2, format!("slxq{pid}"));
    let opts = LoaderOptions::new(format!("slx-pin-{pid}"));
    let pins = PinGuard {
        dir: opts.pin_dir(),
    };

    let iface = IfaceConfig {
        role: IfaceRole::Pod,
        fail_closed: true,
        redirect_all: false,
    };
    let first = XdpLoader::load(&opts).unwrap();
    first.set_config(&ClassifierConfig::default()).unwrap();
    let idx = first
        .attach(&native.host, iface, AttachMode::Native)
        .unwrap();
    let gidx = first
        .attach(&generic.host, iface, AttachMode::Generic)
        .unwrap();
    assert_eq!(idx, ifindex(&native.host).unwrap());
    let id1 = first.program_id().unwrap();
    assert_eq!(
        attached_program_id(idx, AttachMode::Native).unwrap(),
        Some(id1)
    );
    assert_eq!(
        attached_program_id(gidx, AttachMode::Generic).unwrap(),
        Some(id1)
    );

    let db = std::net::Ipv4Addr::new(10, 244, 1, 9);
    let isolated = Isolation {
        ingress: true,
        egress: true,
    };
    first.set_isolation(db, isolated).unwrap();

    // Simulated crash: the process lets go of everything without cleanup.
    drop(first);
    assert_eq!(
        files(&pins.dir.join("maps")),
        [
            "sluice_config",
            "sluice_counters",
            "sluice_ifaces",
            "sluice_isolated",
            "sluice_xsk_slots",
            "xsks"
        ]
    );
    let mut links = vec![idx.to_string(), gidx.to_string()];
    links.sort();
    assert_eq!(files(&pins.dir.join("links")), links);
    assert_eq!(
        attached_program_id(idx, AttachMode::Native).unwrap(),
        Some(id1),
        "program stays attached"
    );

    // Restart: the pinned maps are reused (the interface setting survived),
    // the pinned link gets the new program in place.
    let mut second = XdpLoader::load(&opts).unwrap();
    assert_eq!(second.iface(idx).unwrap(), Some(iface), "pinned map reused");
    assert_eq!(
        second.isolated().unwrap(),
        vec![(db, isolated)],
        "isolation survives"
    );
    let id2 = second.program_id().unwrap();
    assert_ne!(id1, id2);
    assert_eq!(
        second
            .attach(&native.host, iface, AttachMode::Native)
            .unwrap(),
        idx
    );
    assert_eq!(
        attached_program_id(idx, AttachMode::Native).unwrap(),
        Some(id2),
        "link updated"
    );
    assert_eq!(files(&pins.dir.join("links")), links, "no second link");
    assert_eq!(second.attached().unwrap().len(), 2);

    // Detach one, then clean shutdown removes everything.
    second.detach(gidx).unwrap();
    assert_eq!(
        attached_program_id(gidx, AttachMode::Generic).unwrap(),
        None
    );
    assert_eq!(second.iface(gidx).unwrap(), None);
    second.cleanup().unwrap();
    assert!(!pins.dir.exists(), "pin dir left: {:?}", files(&pins.dir));
    assert_eq!(
        attached_program_id(idx, AttachMode::Native).unwrap(),
        None,
        "detached on cleanup"
    );
}

/// A restarted agent finds what the previous run left for interfaces that are gone (a pod deleted
/// while no agent ran) and slots of transmit-only sockets (its punt link, re-created with a new
/// ifindex by every run): load drops them, so nothing piles up and slot numbers come back;
/// `retain_interfaces` drops what the caller no longer owns.
#[test]
fn load_prunes_what_is_gone_and_retain_drops_the_rest() {
    if !require_root("load_prunes_what_is_gone_and_retain_drops_the_rest") {
        return;
    }
    let pid = std::process::id();
    let ns = NetNs::new(format!("slx-prn-{pid}"));
    let kept = pair(&ns, format!("slxk{pid}"));
    let ns2 = NetNs::new(format!("slx-prn2-{pid}"));
    let gone = pair(&ns2, format!("slxg{pid}"));
    let ns3 = NetNs::new(format!("slx-prn3-{pid}"));
    let tx_only = pair(&ns3, format!("slxt{pid}"));
    let opts = LoaderOptions::new(format!("slx-prn-{pid}"));
    let pins = PinGuard {
        dir: opts.pin_dir(),
    };
    let iface = IfaceConfig {
        role: IfaceRole::Pod,
        fail_closed: false,
        redirect_all: false,
    };
    let (k, g, t) = (
        ifindex(&kept.host).unwrap(),
        ifindex(&gone.host).unwrap(),
        ifindex(&tx_only.host).unwrap(),
    );

    let mut first = XdpLoader::load(&opts).unwrap();
    first.set_config(&ClassifierConfig::default()).unwrap();
    for v in [&kept, &gone] {
        first.attach(&v.host, iface, AttachMode::Generic).unwrap();
    }
    let mut xsk = sluice_xdp::Xsk::new(&sluice_xdp::XskConfig {
        frame_count: 64,
        fill_size: 16,
        comp_size: 16,
        rx_size: 16,
        tx_size: 16,
        ..Default::default()
    })
    .unwrap();
    for (v, i) in [(&kept, k), (&gone, g), (&tx_only, t)] {
        let s = xsk.open_socket(&v.host, 0).unwrap();
        first.register_socket(i, 0, xsk.fd(s).unwrap()).unwrap();
    }
    assert_eq!(first.slots().len(), 3);
    // Crash, then the pod is deleted while nothing runs.
    drop(xsk);
    drop(first);
    drop(gone);
    assert!(!sluice_xdp::loader::interface_exists(g));

    let mut second = XdpLoader::load(&opts).unwrap();
    assert_eq!(
        second.attached().unwrap(),
        vec![k],
        "link pin of the gone veth"
    );
    assert_eq!(second.configured().unwrap(), vec![k]);
    let slots: Vec<(u32, u32)> = second.slots().into_iter().map(|(s, _)| s).collect();
    assert_eq!(
        slots,
        vec![(k, 0)],
        "slots of gone and transmit-only sockets"
    );
    assert_eq!(files(&pins.dir.join("links")), vec![k.to_string()]);
    // Nothing left to prune for interfaces that exist and are kept.
    assert!(second.retain_interfaces(|_| true).unwrap().is_empty());

    // The caller no longer owns `kept`: its link is detached, everything of it goes.
    let pruned = second.retain_interfaces(|i| i != k).unwrap();
    assert_eq!(pruned.links, vec![k]);
    assert_eq!(pruned.ifaces, vec![k]);
    assert_eq!(pruned.slots, vec![(k, 0)]);
    assert_eq!(attached_program_id(k, AttachMode::Generic).unwrap(), None);
    assert!(second.slots().is_empty() && second.attached().unwrap().is_empty());
    second.cleanup().unwrap();
    assert!(!pins.dir.exists());
}
