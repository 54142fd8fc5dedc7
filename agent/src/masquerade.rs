//! Masquerade of pod traffic leaving the cluster (Calico's `natOutgoing`, Flannel's `ip-masq`).
//!
//! Traffic from a pod to an address outside the cluster never meets the workers unless an egress
//! policy selects the pod: the XDP program passes it to the kernel, which routes it onto the
//! underlay (selected pods' allowed frames reach the same kernel through the punt link). The
//! outside has no route back to pod addresses, so the node rewrites their source to its own
//! address on the way out. The agent owns one nftables table for that, `ip sluice`, written over
//! netlink (libnftnl through the `nftnl` crate, libmnl to send, as the `nft` tool does):
//!
//! ```text
//! table ip sluice {
//!     chain postrouting {
//!         type nat hook postrouting priority srcnat; policy accept;
//!         ip saddr <cluster> ip daddr != <cluster> ip daddr != <services> [ip daddr != <exclude>...]
//!             counter masquerade
//!     }
//! }
//! ```
//!
//! [`install`] replaces the whole table in one netfilter transaction (a leftover table of a
//! killed agent included), so the rule is never missing nor doubled; [`remove`] deletes it (clean
//! shutdown, or masquerade turned off) and is a no-op when there is none. A SIGKILLed agent leaves
//! the table in place: pods keep reaching the outside while it is down.

use std::ffi::CStr;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use nftnl::{
    Batch, Chain, ChainType, FinalizedBatch, Hook, MsgType, Policy, ProtoFamily, Rule, Table,
};
use nftnl::{expr::CmpOp, nft_expr};

/// The agent's table (family `ip`).
pub const TABLE: &CStr = c"sluice";
/// Its NAT chain on the postrouting hook.
pub const CHAIN: &CStr = c"postrouting";
/// `srcnat`: the priority iptables' nat POSTROUTING chain has.
const SRCNAT_PRIORITY: i32 = 100;

/// What the rule masquerades: sources in `cluster`, to anything outside `keep` (the cluster, the
/// services and the configured exclusions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    pub cluster: Ipv4Net,
    pub keep: Vec<Ipv4Net>,
}

impl Rules {
    /// Pod traffic from `cluster` leaving for anything but `cluster`, `services` and `exclude`.
    pub fn new(cluster: Ipv4Net, services: Ipv4Net, exclude: &[Ipv4Net]) -> Self {
        let mut keep = vec![cluster.trunc(), services.trunc()];
        for net in exclude {
            if !keep.contains(&net.trunc()) {
                keep.push(net.trunc());
            }
        }
        Self {
            cluster: cluster.trunc(),
            keep,
        }
    }
}

/// Talking to netfilter failed.
#[derive(Debug, thiserror::Error)]
#[error("nftables: cannot {what} table ip sluice: {source}")]
pub struct MasqueradeError {
    what: &'static str,
    #[source]
    source: std::io::Error,
}

/// Replace the agent's table with one masquerading what `rules` describes.
pub fn install(rules: &Rules) -> Result<(), MasqueradeError> {
    let table = Table::new(TABLE, ProtoFamily::Ipv4);
    let mut batch = Batch::new();
    // Add-then-delete makes the delete succeed whether or not a table was there.
    batch.add(&table, MsgType::Add);
    batch.add(&table, MsgType::Del);
    batch.add(&table, MsgType::Add);
    let mut chain = Chain::new(CHAIN, &table);
    chain.set_type(ChainType::Nat);
    chain.set_hook(Hook::PostRouting, SRCNAT_PRIORITY);
    chain.set_policy(Policy::Accept);
    batch.add(&chain, MsgType::Add);
    let mut rule = Rule::new(&chain);
    rule.add_expr(&nft_expr!(payload ipv4 saddr));
    rule.add_expr(&nft_expr!(bitwise mask rules.cluster.netmask(), xor Ipv4Addr::UNSPECIFIED));
    rule.add_expr(&nft_expr!(cmp == rules.cluster.network()));
    for net in &rules.keep {
        rule.add_expr(&nft_expr!(payload ipv4 daddr));
        rule.add_expr(&nft_expr!(bitwise mask net.netmask(), xor Ipv4Addr::UNSPECIFIED));
        rule.add_expr(&nftnl::expr::Cmp::new(CmpOp::Neq, net.network()));
    }
    rule.add_expr(&nft_expr!(counter));
    rule.add_expr(&nft_expr!(masquerade));
    batch.add(&rule, MsgType::Add);
    send(&batch.finalize()).map_err(|source| MasqueradeError {
        what: "install",
        source,
    })
}

/// Delete the agent's table, if there is one.
pub fn remove() -> Result<(), MasqueradeError> {
    let table = Table::new(TABLE, ProtoFamily::Ipv4);
    let mut batch = Batch::new();
    batch.add(&table, MsgType::Add);
    batch.add(&table, MsgType::Del);
    send(&batch.finalize()).map_err(|source| MasqueradeError {
        what: "remove",
        source,
    })
}

/// Send one transaction and check every acknowledgement (the first error aborts it whole).
fn send(batch: &FinalizedBatch) -> std::io::Result<()> {
    let socket = mnl::Socket::new(mnl::Bus::Netfilter)?;
    let portid = socket.portid();
    socket.send_all(batch)?;
    let mut buffer = vec![0u8; nftnl::nft_nlmsg_maxsize() as usize];
    let mut expected = batch.sequence_numbers();
    while !expected.is_empty() {
        for message in socket.recv(&mut buffer[..])? {
            let message = message?;
            let Some(seq) = expected.next() else {
                return Err(std::io::Error::other("unexpected acknowledgement"));
            };
            mnl::cb_run(message, seq, portid)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn the_cluster_and_services_are_always_kept_and_exclusions_once() {
        let r = Rules::new(
            net("10.244.1.7/16"),
            net("10.96.0.0/12"),
            &[
                net("192.168.0.0/16"),
                net("10.244.0.0/16"),
                net("192.168.3.0/16"),
            ],
        );
        assert_eq!(r.cluster, net("10.244.0.0/16"));
        assert_eq!(
            r.keep,
            vec![
                net("10.244.0.0/16"),
                net("10.96.0.0/12"),
                net("192.168.0.0/16")
            ]
        );
    }

    /// `nft list table ip sluice` in this thread's network namespace (a child inherits it).
    fn listed() -> Option<String> {
        let out = std::process::Command::new("nft")
            .args(["list", "table", "ip", "sluice"])
            .output()
            .expect("nft runs");
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Install, replace and remove the table in a network namespace of the test's own (a thread
    /// that unshared its network namespace; the machine's is untouched), read back with `nft`.
    #[test]
    fn install_replaces_the_table_whole_and_remove_leaves_none() {
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var("SLUICE_ALLOW_SKIP").as_deref() == Ok("1"),
                "the masquerade test writes nftables in a namespace of its own and needs root; \
                 set SLUICE_ALLOW_SKIP=1 to skip"
            );
            eprintln!("skipped: the masquerade test needs root");
            return;
        }
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
            remove().expect("removing no table is fine");
            assert_eq!(listed(), None);
            let first = Rules::new(net("10.244.0.0/16"), net("10.96.0.0/12"), &[]);
            install(&first).expect("install");
            let second = Rules::new(
                net("10.244.0.0/16"),
                net("10.96.0.0/12"),
                &[net("192.168.0.0/16")],
            );
            install(&second).expect("install again");
            let table = listed().expect("the table is there");
            println!("{table}");
            assert!(
                table.contains("type nat hook postrouting priority srcnat; policy accept;"),
                "{table}"
            );
            let rules: Vec<&str> = table.lines().filter(|l| l.contains("masquerade")).collect();
            assert_eq!(
                rules,
                vec![
                    "\t\tip saddr 10.244.0.0/16 ip daddr != 10.244.0.0/16 \
                     ip daddr != 10.96.0.0/12 ip daddr != 192.168.0.0/16 \
                     counter packets 0 bytes 0 masquerade"
                ],
                "one rule, the second install's"
            );
            remove().expect("remove");
            assert_eq!(listed(), None);
        })
        .join()
        .expect("the namespace thread");
    }
}
