//! Classification in the kernel without traffic: golden frames through
//! BPF_PROG_TEST_RUN, asserting the action and the counter of each rule.

mod common;

use std::net::Ipv4Addr;

use common::*;
use sluice_xdp::{
    ClassifierConfig, Counters, IfaceConfig, IfaceRole, Ipv4Cidr, Isolation, LoaderOptions,
    XdpLoader, Xsk, XskConfig,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
const UDP: u8 = 17;
const TCP: u8 = 6;
const UNDERLAY: [u8; 4] = [192, 168, 50, 2];

fn diff(a: &Counters, b: &Counters) -> Vec<&'static str> {
    let mut v = Vec::new();
    let fields: [(&str, u64, u64); 14] = [
        ("match_cluster", a.match_cluster, b.match_cluster),
        ("match_service", a.match_service, b.match_service),
        ("match_vxlan", a.match_vxlan, b.match_vxlan),
        ("match_nodeport", a.match_nodeport, b.match_nodeport),
        ("match_ipv6", a.match_ipv6, b.match_ipv6),
        ("match_all", a.match_all, b.match_all),
        ("redirected", a.redirected, b.redirected),
        ("pass_no_socket", a.pass_no_socket, b.pass_no_socket),
        ("drop_no_socket", a.drop_no_socket, b.drop_no_socket),
        (
            "pass_unknown_iface",
            a.pass_unknown_iface,
            b.pass_unknown_iface,
        ),
        ("pass_non_ip", a.pass_non_ip, b.pass_non_ip),
        ("pass_ipv6", a.pass_ipv6, b.pass_ipv6),
        ("pass_other", a.pass_other, b.pass_other),
        ("pass_malformed", a.pass_malformed, b.pass_malformed),
    ];
    for (name, before, after) in fields {
        for _ in before..after {
            v.push(name);
        }
    }
    v
}

/// Runs `frame` on lo and checks the action and exactly which counters moved.
fn check(l: &XdpLoader, what: &str, frame: &[u8], action: u32, counters: &[&str]) {
    let before = l.counters().unwrap();
    let got = l.test_run(frame, 1, 0).unwrap();
    let after = l.counters().unwrap();
    assert_eq!(got, action, "{what}: action");
    assert_eq!(diff(&before, &after), counters, "{what}: counters");
}

#[test]
fn golden_frames_are_classified_per_rule() {
    if !require_root("golden_frames_are_classified_per_rule") {
        return;
    }
    let opts = LoaderOptions::new(format!("slx-cls-{}", std::process::id()));
    let _pins = PinGuard {
        dir: opts.pin_dir(),
    };
    let mut l = XdpLoader::load(&opts).unwrap();
    l.set_config(&ClassifierConfig {
        underlay_addr: Some(Ipv4Addr::from(UNDERLAY)),
        ..ClassifierConfig::default()
    })
    .unwrap();
    let lo = 1;

    // Unknown interface: everything passes.
    check(
        &l,
        "unconfigured iface",
        &ipv4_frame([10, 244, 1, 3], UDP, 53, 10),
        XDP_PASS,
        &["pass_unknown_iface"],
    );

    // Pod interface, no socket yet: matches fall back to the kernel.
    let pod = IfaceConfig {
        role: IfaceRole::Pod,
        fail_closed: false,
        redirect_all: false,
    };
    l.set_iface(lo, pod).unwrap();
    check(
        &l,
        "cluster, no socket",
        &ipv4_frame([10, 244, 1, 3], UDP, 53, 10),
        XDP_PASS,
        &["match_cluster", "pass_no_socket"],
    );

    // A real socket on (lo, 0): matches now redirect.
    let mut xsk = Xsk::new(&XskConfig {
        frame_count: 64,
        fill_size: 32,
        comp_size: 32,
        rx_size: 32,
        tx_size: 32,
        ..XskConfig::default()
    })
    .unwrap();
    let sock = xsk.open_socket("lo", 0).unwrap();
    l.register_socket(lo, 0, xsk.fd(sock).unwrap()).unwrap();

    check(
        &l,
        "cluster CIDR",
        &ipv4_frame([10, 244, 1, 3], UDP, 53, 10),
        XDP_REDIRECT,
        &["match_cluster", "redirected"],
    );
    check(
        &l,
        "cluster CIDR edge",
        &ipv4_frame([10, 244, 255, 255], TCP, 80, 0),
        XDP_REDIRECT,
        &["match_cluster", "redirected"],
    );
    check(
        &l,
        "outside cluster CIDR",
        &ipv4_frame([10, 245, 0, 1], TCP, 80, 0),
        XDP_PASS,
        &["pass_other"],
    );
    check(
        &l,
        "service CIDR",
        &ipv4_frame([10, 96, 0, 10], TCP, 443, 0),
        XDP_REDIRECT,
        &["match_service", "redirected"],
    );
    check(
        &l,
        "service CIDR /12 end",
        &ipv4_frame([10, 111, 255, 254], UDP, 53, 4),
        XDP_REDIRECT,
        &["match_service", "redirected"],
    );
    check(
        &l,
        "outside service CIDR",
        &ipv4_frame([10, 112, 0, 1], UDP, 53, 4),
        XDP_PASS,
        &["pass_other"],
    );
    check(
        &l,
        "host-bound (gateway)",
        &ipv4_frame([169, 254, 1, 1], UDP, 53, 4),
        XDP_PASS,
        &["pass_other"],
    );
    check(
        &l,
        "outside traffic",
        &ipv4_frame([8, 8, 8, 8], TCP, 443, 0),
        XDP_PASS,
        &["pass_other"],
    );
    check(
        &l,
        "VXLAN on a pod iface",
        &ipv4_frame(UNDERLAY, UDP, 8472, 60),
        XDP_PASS,
        &["pass_other"],
    );
    check(
        &l,
        "NodePort on a pod iface",
        &ipv4_frame(UNDERLAY, TCP, 30080, 0),
        XDP_PASS,
        &["pass_other"],
    );
    check(&l, "ARP", &arp_frame(), XDP_PASS, &["pass_non_ip"]);
    check(
        &l,
        "IPv6 (not configured)",
        &ipv6_frame(UDP),
        XDP_PASS,
        &["pass_ipv6"],
    );
    let mut truncated = ipv4_frame([10, 244, 1, 3], UDP, 53, 0);
    truncated.truncate(14 + 12);
    check(
        &l,
        "truncated IPv4 header",
        &truncated,
        XDP_PASS,
        &["pass_malformed"],
    );
    // A 9000-byte frame spans fragments in test_run (xdp.frags).
    check(
        &l,
        "cluster, 9000 bytes (frags)",
        &ipv4_frame([10, 244, 9, 9], UDP, 9, 8958),
        XDP_REDIRECT,
        &["match_cluster", "redirected"],
    );

    // Uplink rules.
    l.set_iface(
        lo,
        IfaceConfig {
            role: IfaceRole::Uplink,
            fail_closed: false,
            redirect_all: false,
        },
    )
    .unwrap();
    check(
        &l,
        "VXLAN to us",
        &ipv4_frame(UNDERLAY, UDP, 8472, 60),
        XDP_REDIRECT,
        &["match_vxlan", "redirected"],
    );
    check(
        &l,
        "VXLAN to another node",
        &ipv4_frame([192, 168, 50, 3], UDP, 8472, 60),
        XDP_PASS,
        &["pass_other"],
    );
    check(
        &l,
        "TCP 8472 to us (not VXLAN, not NodePort)",
        &ipv4_frame(UNDERLAY, TCP, 8472, 0),
        XDP_PASS,
        &["pass_other"],
    );
    check(
        &l,
        "NodePort TCP low end",
        &ipv4_frame(UNDERLAY, TCP, 30000, 0),
        XDP_REDIRECT,
        &["match_nodeport", "redirected"],
    );
    check(
        &l,
        "NodePort UDP high end",
        &ipv4_frame(UNDERLAY, UDP, 32767, 4),
        XDP_REDIRECT,
        &["match_nodeport", "redirected"],
    );
    check(
        &l,
        "below NodePort range",
        &ipv4_frame(UNDERLAY, TCP, 29999, 0),
        XDP_PASS,
        &["pass_other"],
    );
    check(
        &l,
        "above NodePort range",
        &ipv4_frame(UNDERLAY, TCP, 32768, 0),
        XDP_PASS,
        &["pass_other"],
    );
    check(
        &l,
        "NodePort to another address",
        &ipv4_frame([192, 168, 50, 3], TCP, 30080, 0),
        XDP_PASS,
        &["pass_other"],
    );
    check(
        &l,
        "host-bound SSH on uplink",
        &ipv4_frame(UNDERLAY, TCP, 22, 0),
        XDP_PASS,
        &["pass_other"],
    );
    check(
        &l,
        "cluster CIDR on uplink",
        &ipv4_frame([10, 244, 2, 7], TCP, 80, 0),
        XDP_REDIRECT,
        &["match_cluster", "redirected"],
    );

    // Configurable port and range.
    l.set_config(&ClassifierConfig {
        underlay_addr: Some(Ipv4Addr::from(UNDERLAY)),
        vxlan_port: 4789,
        nodeport_range: 31000..=31010,
        cluster_cidr: Ipv4Cidr::new(Ipv4Addr::new(172, 16, 0, 0), 16).unwrap(),
        ..ClassifierConfig::default()
    })
    .unwrap();
    check(
        &l,
        "VXLAN on the configured port",
        &ipv4_frame(UNDERLAY, UDP, 4789, 60),
        XDP_REDIRECT,
        &["match_vxlan", "redirected"],
    );
    check(
        &l,
        "old VXLAN port",
        &ipv4_frame(UNDERLAY, UDP, 8472, 60),
        XDP_PASS,
        &["pass_other"],
    );
    check(
        &l,
        "NodePort outside the configured range",
        &ipv4_frame(UNDERLAY, TCP, 30080, 0),
        XDP_PASS,
        &["pass_other"],
    );
    check(
        &l,
        "other cluster CIDR",
        &ipv4_frame([172, 16, 3, 3], TCP, 80, 0),
        XDP_REDIRECT,
        &["match_cluster", "redirected"],
    );
    check(
        &l,
        "old cluster CIDR",
        &ipv4_frame([10, 244, 3, 3], TCP, 80, 0),
        XDP_PASS,
        &["pass_other"],
    );

    // IPv6 when configured (pods only, ICMPv6 still to the kernel).
    l.set_config(&ClassifierConfig {
        redirect_ipv6: true,
        ..ClassifierConfig::default()
    })
    .unwrap();
    l.set_iface(lo, pod).unwrap();
    check(
        &l,
        "IPv6 UDP, configured",
        &ipv6_frame(UDP),
        XDP_REDIRECT,
        &["match_ipv6", "redirected"],
    );
    check(
        &l,
        "ICMPv6 (ND), configured",
        &ipv6_frame(58),
        XDP_PASS,
        &["pass_ipv6"],
    );

    // Fail closed: no socket means drop, not pass.
    l.unregister_socket(lo, 0).unwrap();
    l.set_iface(
        lo,
        IfaceConfig {
            role: IfaceRole::Pod,
            fail_closed: true,
            redirect_all: false,
        },
    )
    .unwrap();
    assert_eq!(
        l.iface(lo).unwrap(),
        Some(IfaceConfig {
            role: IfaceRole::Pod,
            fail_closed: true,
            redirect_all: false
        })
    );
    check(
        &l,
        "fail-closed, no socket",
        &ipv4_frame([10, 244, 1, 3], UDP, 53, 10),
        XDP_DROP,
        &["match_cluster", "drop_no_socket"],
    );
    check(
        &l,
        "fail-closed, not matched",
        &ipv4_frame([8, 8, 8, 8], UDP, 53, 10),
        XDP_PASS,
        &["pass_other"],
    );

    // Redirect-all (a pod its egress policy selects): outside and host-bound IPv4 go to the
    // worker too; without a socket and fail-closed they are dropped; ARP still passes.
    l.set_iface(
        lo,
        IfaceConfig {
            role: IfaceRole::Pod,
            fail_closed: true,
            redirect_all: true,
        },
    )
    .unwrap();
    check(
        &l,
        "redirect-all, outside address, no socket",
        &ipv4_frame([8, 8, 8, 8], UDP, 53, 10),
        XDP_DROP,
        &["match_all", "drop_no_socket"],
    );
    check(
        &l,
        "redirect-all, underlay address, no socket",
        &ipv4_frame(UNDERLAY, TCP, 22, 10),
        XDP_DROP,
        &["match_all", "drop_no_socket"],
    );

    // Fail-open interface, but the destination is a pod isolated for ingress: dropped too (the
    // kernel would deliver it without policy); isolated only for egress, or another pod: passed.
    l.set_iface(
        lo,
        IfaceConfig {
            role: IfaceRole::Pod,
            fail_closed: false,
            redirect_all: false,
        },
    )
    .unwrap();
    let db = Ipv4Addr::new(10, 244, 1, 7);
    l.set_isolation(
        db,
        Isolation {
            ingress: true,
            egress: false,
        },
    )
    .unwrap();
    l.set_isolation(
        Ipv4Addr::new(10, 244, 1, 8),
        Isolation {
            ingress: false,
            egress: true,
        },
    )
    .unwrap();
    assert_eq!(l.isolated().unwrap().len(), 2);
    check(
        &l,
        "fail-open, no socket, ingress-isolated destination",
        &ipv4_frame(db.octets(), UDP, 53, 10),
        XDP_DROP,
        &["match_cluster", "drop_no_socket"],
    );
    check(
        &l,
        "fail-open, no socket, egress-isolated destination",
        &ipv4_frame([10, 244, 1, 8], UDP, 53, 10),
        XDP_PASS,
        &["match_cluster", "pass_no_socket"],
    );
    // VXLAN on a fail-open uplink without a socket: the kernel's standby VXLAN device would
    // decapsulate it, so the inner destination's isolation decides.
    l.set_config(&ClassifierConfig {
        underlay_addr: Some(Ipv4Addr::from(UNDERLAY)),
        ..ClassifierConfig::default()
    })
    .unwrap();
    l.set_iface(
        lo,
        IfaceConfig {
            role: IfaceRole::Uplink,
            fail_closed: false,
            redirect_all: false,
        },
    )
    .unwrap();
    let vxlan_to = |inner: [u8; 4]| {
        let mut f = ipv4_frame(UNDERLAY, UDP, 8472, 8);
        f.extend_from_slice(&ipv4_frame(inner, TCP, 80, 0));
        f
    };
    check(
        &l,
        "VXLAN, no socket, inner destination ingress-isolated",
        &vxlan_to(db.octets()),
        XDP_DROP,
        &["match_vxlan", "drop_no_socket"],
    );
    check(
        &l,
        "VXLAN, no socket, inner destination egress-isolated",
        &vxlan_to([10, 244, 1, 8]),
        XDP_PASS,
        &["match_vxlan", "pass_no_socket"],
    );
    check(
        &l,
        "VXLAN, no socket, no inner frame",
        &ipv4_frame(UNDERLAY, UDP, 8472, 8),
        XDP_PASS,
        &["match_vxlan", "pass_no_socket"],
    );
    l.set_iface(
        lo,
        IfaceConfig {
            role: IfaceRole::Pod,
            fail_closed: false,
            redirect_all: false,
        },
    )
    .unwrap();
    l.set_isolation(db, Isolation::default()).unwrap();
    assert_eq!(
        l.isolated().unwrap(),
        vec![(
            Ipv4Addr::new(10, 244, 1, 8),
            Isolation {
                ingress: false,
                egress: true
            }
        )]
    );
    check(
        &l,
        "fail-open, no socket, isolation lifted",
        &ipv4_frame(db.octets(), UDP, 53, 10),
        XDP_PASS,
        &["match_cluster", "pass_no_socket"],
    );

    l.clear_iface(lo).unwrap();
    drop(xsk);
    let dir = l.pin_dir().to_path_buf();
    l.cleanup().unwrap();
    assert!(!dir.exists(), "pin dir {} left behind", dir.display());
}
