//! IPAM under load and under SIGKILL: 100 concurrent ADDs get 100 distinct addresses and 100
//! DELs free them; a plugin killed between any two steps leaks nothing and double-allocates
//! nothing once the next invocation, a retry or GC has run.

mod common;

use std::collections::BTreeSet;

use common::*;
use serde_json::json;

#[test]
fn hundred_concurrent_adds_and_dels() {
    if !require_root("hundred_concurrent_adds_and_dels") {
        return;
    }
    let node = Node::standalone("many", "1.0.0", "10.252.0.0/24");
    let pods: Vec<Netns> = (0..100).map(|i| Netns::new(&format!("many{i}"))).collect();
    let ips: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let node = &node;
                s.spawn(move || result_ip(node.add(&format!("ctr-many-{i}"), p).ok()))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("ADD thread"))
            .collect()
    });
    let distinct: BTreeSet<&String> = ips.iter().collect();
    assert_eq!(distinct.len(), 100, "addresses: {ips:?}");
    assert_eq!(node.allocations().len(), 100);
    assert_eq!(node.host_veths().len(), 100);
    std::thread::scope(|s| {
        for (i, p) in pods.iter().enumerate() {
            let node = &node;
            s.spawn(move || {
                node.del(&format!("ctr-many-{i}"), p).ok();
            });
        }
    });
    assert!(node.allocations().is_empty(), "{:?}", node.allocations());
    assert!(node.host_veths().is_empty());
}

const CRASH_POINTS: [&str; 6] = [
    "ipam-temporary-written",
    "reserved",
    "veth-created",
    "wired",
    "registered",
    "committed",
];

#[test]
fn sigkill_between_steps_leaks_nothing() {
    if !require_root("sigkill_between_steps_leaks_nothing") {
        return;
    }
    for point in CRASH_POINTS {
        let node = Node::standalone(&format!("kill{}", point.len()), "1.1.0", "10.252.1.0/29");
        let (a, b) = (Netns::new("kill-a"), Netns::new("kill-b"));
        let crashed = node.call_env(
            "ADD",
            &node.conf,
            "ctr-k1",
            &a.path(),
            "eth0",
            &[("SLUICE_CNI_CRASH_AT", point)],
        );
        assert_eq!(
            crashed.signal,
            Some(9),
            "{point}: the plugin should have been killed: {crashed:?}"
        );
        // Another container's ADD goes through and never gets the crashed one's address twice.
        let ip_b = result_ip(node.add("ctr-k2", &b).ok());
        // The runtime retries the crashed ADD: it succeeds, with a distinct address.
        let ip_a = result_ip(node.add("ctr-k1", &a).ok());
        assert_ne!(ip_a, ip_b, "{point}: double allocation");
        assert_eq!(
            node.allocations().len(),
            2,
            "{point}: {:?}",
            node.allocations()
        );
        assert_eq!(
            node.host_veths().len(),
            2,
            "{point}: {:?}",
            node.host_veths()
        );
        // GC keeps only what the runtime lists.
        let gc = json!({ "cni.dev/valid-attachments": [ { "containerID": "ctr-k2", "ifname": "eth0" } ] });
        exec_plugin(
            BIN,
            Some(&node.host),
            &[("CNI_COMMAND", "GC")],
            with(&node.conf, gc).to_string().as_bytes(),
        )
        .ok();
        assert_eq!(
            node.allocations().len(),
            1,
            "{point}: {:?}",
            node.allocations()
        );
        node.del("ctr-k2", &b).ok();
        assert!(
            node.allocations().is_empty(),
            "{point}: {:?}",
            node.allocations()
        );
        assert!(
            node.host_veths().is_empty(),
            "{point}: {:?}",
            node.host_veths()
        );
    }
}

#[test]
fn sigkill_then_gc_alone_cleans_up() {
    if !require_root("sigkill_then_gc_alone_cleans_up") {
        return;
    }
    for point in CRASH_POINTS {
        let node = Node::standalone("killgc", "1.1.0", "10.252.2.0/29");
        let a = Netns::new("killgc-a");
        let crashed = node.call_env(
            "ADD",
            &node.conf,
            "ctr-g1",
            &a.path(),
            "eth0",
            &[("SLUICE_CNI_CRASH_AT", point)],
        );
        assert_eq!(crashed.signal, Some(9), "{point}");
        // The runtime gives up on the container and garbage-collects.
        let gc = json!({ "cni.dev/valid-attachments": [] });
        exec_plugin(
            BIN,
            Some(&node.host),
            &[("CNI_COMMAND", "GC")],
            with(&node.conf, gc).to_string().as_bytes(),
        )
        .ok();
        assert!(
            node.allocations().is_empty(),
            "{point}: {:?}",
            node.allocations()
        );
        assert!(
            node.host_veths().is_empty(),
            "{point}: {:?}",
            node.host_veths()
        );
        assert!(!a.links().contains(&"eth0".to_string()), "{point}");
        // And a DEL of the crashed container afterwards is still fine.
        node.del("ctr-g1", &a).ok();
    }
}
