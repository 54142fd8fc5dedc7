//! Real traffic: two pods wired by the plugin (standalone mode) in a dedicated host namespace
//! reach each other through the kernel (host /32 routes, ip_forward), small and large packets.

mod common;

use common::*;

#[test]
fn two_pods_ping_each_other() {
    if !require_root("two_pods_ping_each_other") {
        return;
    }
    let node = Node::standalone("ping", "1.0.0", "10.251.1.0/24");
    node.host.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    let (a, b) = (Netns::new("ping-a"), Netns::new("ping-b"));
    let ip_a = result_ip(node.add("ctr-ping-a", &a).ok());
    let ip_b = result_ip(node.add("ctr-ping-b", &b).ok());
    assert_ne!(ip_a, ip_b);
    let out = a.exec(&["ping", "-c", "3", "-W", "5", &ip_b]);
    assert!(
        out.status.success(),
        "ping a->b: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = b.exec(&["ping", "-c", "3", "-W", "5", &ip_a]);
    assert!(
        out.status.success(),
        "ping b->a: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Large packets inside the node's pod CIDR use the large MTU without fragmenting.
    let out = a.exec(&[
        "ping", "-c", "2", "-W", "5", "-M", "do", "-s", "8000", &ip_b,
    ]);
    assert!(
        out.status.success(),
        "8000-byte ping a->b: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // TCP through the kernel (the pods offload their checksums; the kernel keeps them partial).
    let server = std::process::Command::new("ip")
        .args([
            "netns", "exec", &b.name, "busybox", "nc", "-l", "-p", "5001",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start nc server");
    let mut sent = false;
    for _ in 0..50 {
        let out = a.exec(&[
            "sh",
            "-c",
            &format!("echo sluice-tcp | busybox nc {ip_b} 5001"),
        ]);
        if out.status.success() {
            sent = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let got = server.wait_with_output().expect("nc server");
    assert!(sent, "TCP connect a->b failed");
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "sluice-tcp");
    node.del("ctr-ping-a", &a).ok();
    node.del("ctr-ping-b", &b).ok();
    assert!(node.allocations().is_empty());
    assert!(node.host_veths().is_empty());
}
