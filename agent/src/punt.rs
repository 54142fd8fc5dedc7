//! The punt link: how a worker hands a frame the XDP program redirected back to the kernel.
//!
//! An AF_XDP socket cannot return a frame to the stack it was taken from, so the agent keeps a
//! veth pair in the node's namespace: `sluice-punt` (one queue per worker, each worker's socket
//! transmits on its own queue) and its peer `sluice-host`, which the kernel sees as an ordinary
//! interface. A worker whose pipeline says "pass to the kernel" (a pod's egress policy allowed a
//! frame to the node or outside the cluster; the XDP program redirected it only so that policy
//! could be applied) rewrites the destination MAC to `sluice-host`'s and transmits on
//! `sluice-punt`: the kernel then routes (and masquerades) it as if the pod had sent it directly.
//! Reverse-path filtering would drop those frames (the pod's address routes via its own veth, and
//! the kernel rejects any source on an interface without an address): `sluice-host` gets
//! `rp_filter` 2 (loose) and a link-scoped address ([`HOST_ADDR`]). The kernel filters with the
//! larger of `conf/all/rp_filter` and the interface's own value, so loose wins over a node's strict
//! `net.ipv4.conf.all.rp_filter=1` as well (tested in `tests/tests/failclosed.rs`). No IPv6, the
//! pod MTU.
//!
//! Created through netlink when the agent starts (a leftover pair of a killed agent is replaced),
//! removed on clean shutdown.

use futures::TryStreamExt;
use netlink_packet_route::address::AddressScope;
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec};

use super::config::Mac;
use super::tables::PortId;

/// The worker side of the pair (AF_XDP sockets transmit here).
pub const PUNT_IFNAME: &str = "sluice-punt";
/// The kernel side of the pair.
pub const HOST_IFNAME: &str = "sluice-host";

/// The link-scoped address of `sluice-host` (never a source for routed traffic; it only gives
/// the interface an address, which loose reverse-path filtering requires).
pub const HOST_ADDR: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 255, 254);

/// Where punted frames go: the port the workers transmit on and the MAC they address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Punt {
    pub port: PortId,
    pub host_mac: Mac,
}

impl Punt {
    /// Address `frame` (an Ethernet frame) to the kernel side of the link, for transmission on
    /// [`Punt::port`]. Returns false, changing nothing, for a frame too short to be Ethernet.
    pub fn readdress(&self, frame: &mut [u8]) -> bool {
        if frame.len() < 14 {
            return false;
        }
        frame[..6].copy_from_slice(&self.host_mac.0);
        true
    }
}

/// Setting up or removing the punt link failed.
#[derive(Debug, thiserror::Error)]
pub enum PuntError {
    #[error("netlink: cannot {what}: {message}")]
    Netlink { what: String, message: String },
    #[error("cannot set {path}: {source}")]
    Sysctl {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> PuntError {
    let what = what.into();
    move |e| PuntError::Netlink {
        what,
        message: e.to_string(),
    }
}

fn connect() -> Result<Handle, PuntError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| PuntError::Netlink {
        what: "open a netlink socket".into(),
        message: e.to_string(),
    })?;
    tokio::spawn(conn);
    Ok(handle)
}

/// (ifindex, MAC) of `name`, if it exists.
async fn find(h: &Handle, name: &str) -> Result<Option<(u32, Option<Mac>)>, PuntError> {
    let mut links = h.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(m)) => {
            let mac = m.attributes.iter().find_map(|a| match a {
                LinkAttribute::Address(b) => Mac::try_from(b.as_slice()).ok(),
                _ => None,
            });
            Ok(Some((m.header.index, mac)))
        }
        Ok(None) => Ok(None),
        Err(rtnetlink::Error::NetlinkError(e))
            if e.to_io().raw_os_error() == Some(libc::ENODEV) =>
        {
            Ok(None)
        }
        Err(e) => Err(nl(format!("look up {name}"))(e)),
    }
}

fn sysctl(path: &str, value: &str) -> Result<(), PuntError> {
    std::fs::write(path, value).map_err(|source| PuntError::Sysctl {
        path: path.to_owned(),
        source,
    })
}

/// Create (or re-create) the pair with `queues` queues on each end and MTU `mtu`, up.
pub async fn create(queues: u32, mtu: u32) -> Result<Punt, PuntError> {
    let h = connect()?;
    remove_with(&h).await?;
    let queues = queues.max(1);
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(HOST_IFNAME)
        .mtu(mtu)
        .append_extra_attribute(LinkAttribute::NumTxQueues(queues))
        .append_extra_attribute(LinkAttribute::NumRxQueues(queues))
        .build();
    let veth = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
        .name(PUNT_IFNAME)
        .mtu(mtu)
        .append_extra_attribute(LinkAttribute::NumTxQueues(queues))
        .append_extra_attribute(LinkAttribute::NumRxQueues(queues))
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    h.link()
        .add(veth)
        .execute()
        .await
        .map_err(nl(format!("create veth {PUNT_IFNAME} <-> {HOST_IFNAME}")))?;
    for name in [HOST_IFNAME, PUNT_IFNAME] {
        // Best effort: without IPv6 the kernel sends nothing of its own into the pair.
        let _ = sysctl(&format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    }
    sysctl(
        &format!("/proc/sys/net/ipv4/conf/{HOST_IFNAME}/rp_filter"),
        "2",
    )?;
    let missing = |name: &str| PuntError::Netlink {
        what: format!("find {name} after creating it"),
        message: "no such link".into(),
    };
    let (host_index, host_mac) = find(&h, HOST_IFNAME)
        .await?
        .ok_or_else(|| missing(HOST_IFNAME))?;
    let (punt_index, _) = find(&h, PUNT_IFNAME)
        .await?
        .ok_or_else(|| missing(PUNT_IFNAME))?;
    for (name, index) in [(HOST_IFNAME, host_index), (PUNT_IFNAME, punt_index)] {
        h.link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(nl(format!("set {name} up")))?;
    }
    let mut add = h
        .address()
        .add(host_index, std::net::IpAddr::V4(HOST_ADDR), 32);
    add.message_mut().header.scope = AddressScope::Link;
    add.execute()
        .await
        .map_err(nl(format!("add {HOST_ADDR}/32 to {HOST_IFNAME}")))?;
    let host_mac = host_mac.ok_or_else(|| PuntError::Netlink {
        what: format!("read the MAC of {HOST_IFNAME}"),
        message: "no address attribute".into(),
    })?;
    Ok(Punt {
        port: PortId(punt_index),
        host_mac,
    })
}

async fn remove_with(h: &Handle) -> Result<(), PuntError> {
    if let Some((index, _)) = find(h, PUNT_IFNAME).await? {
        h.link()
            .del(index)
            .execute()
            .await
            .map_err(nl(format!("delete {PUNT_IFNAME}")))?;
    }
    Ok(())
}

/// Remove the pair (clean shutdown); a missing pair is fine.
pub async fn remove() -> Result<(), PuntError> {
    remove_with(&connect()?).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readdress_sets_the_destination_mac_of_ethernet_frames_only() {
        let p = Punt {
            port: PortId(4),
            host_mac: Mac([2, 0, 0, 0, 0, 9]),
        };
        let mut frame = [0xaau8; 60];
        assert!(p.readdress(&mut frame));
        assert_eq!(frame[..6], [2, 0, 0, 0, 0, 9]);
        assert!(
            frame[6..].iter().all(|b| *b == 0xaa),
            "only the destination changes"
        );
        let mut short = [0xaau8; 13];
        assert!(!p.readdress(&mut short));
        assert!(short.iter().all(|b| *b == 0xaa));
    }
}
