//! The standby kernel path to other nodes: what carries a pod's cross-node traffic while no
//! worker holds its sockets (the agent killed, crashed or being upgraded).
//!
//! Without a worker the XDP program passes a pod's frames to the kernel (fail-open, see the
//! README). Same-node traffic then follows the pods' host routes; this module gives the kernel
//! the way to the other nodes: a Flannel-compatible VXLAN device, [`IFNAME`], programmed as
//! DESIGN's Conventions program `flannel.1` (VNI, UDP port and local address of this node's VTEP,
//! on the uplink, `nolearning`, no UDP checksum, this node's VTEP MAC, MTU underlay - 50, address
//! `10.244.N.0/32`), and for every peer node a route `<its pod CIDR> via <its VTEP address>
//! onlink`, a permanent neighbor entry giving that address the peer's VTEP MAC, and an FDB entry
//! sending that MAC to the peer's underlay address.
//!
//! What it promises:
//! - It carries no pod traffic while the agent runs: the XDP program redirects every frame for the
//!   cluster (from a pod veth, and VXLAN arriving on the uplink) into a socket before the kernel
//!   sees it. Only the node itself (host processes, which never pass a worker) reaches pods of
//!   other nodes through it at any time, as on a Flannel node.
//! - With the agent gone, a pod's frame for another node is routed into the device; a frame larger
//!   than the device's MTU (pods use the large MTU on cluster routes) is answered by the kernel
//!   with ICMP fragmentation-needed, so the pod's TCP lowers its path MTU for that destination.
//!   VXLAN arriving on the uplink passes to the kernel and the device decapsulates it (the inner
//!   destination MAC is this node's VTEP MAC, which peers' workers and kernels both use).
//! - The peer's side is unchanged: its worker decapsulates what the device sends like any Flannel
//!   node's frames (same VNI, port, inner MACs); a peer whose agent is down decapsulates in its
//!   own device.
//! - NetworkPolicy fail-closed is untouched: frames of isolated pods are dropped by the XDP program
//!   before the kernel could route them here.
//!
//! A background task ([`Standby::spawn`]) creates or adopts the device (a device left by an
//! earlier agent is kept when its settings match, so a restart never removes the path while the
//! new agent takes over) and keeps its peers equal to the ones the agent publishes, re-applying
//! periodically and retrying with backoff on errors. Peers not in the list are removed only once
//! the list is complete (in control-plane mode: after the first revision arrived), so an agent
//! restarted without its control plane keeps the peers of its predecessor. Removed on clean
//! shutdown. Product code speaks netlink (rtnetlink) only.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourState,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader};
use rtnetlink::{Handle, LinkUnspec, LinkVxlan, RouteMessageBuilder};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::config::{Mac, NodeConfig};

/// The standby VXLAN device (Flannel's `flannel.1`).
pub const IFNAME: &str = "sluice-vxlan";

/// How often the device and its peers are checked and re-applied without a change.
const RESYNC: Duration = Duration::from_secs(30);

/// This node's end of the tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub vni: u32,
    pub port: u16,
    /// The node's underlay address (outer source).
    pub local: Ipv4Addr,
    /// The uplink the outer frames leave on.
    pub uplink: String,
    /// The node's VTEP MAC (inner source of what it sends, inner destination of what it takes).
    pub mac: Mac,
    /// The underlay MTU minus the VXLAN overhead.
    pub mtu: u32,
    /// The node's VTEP address, `10.244.N.0`.
    pub address: Ipv4Addr,
}

impl Device {
    /// The device of the node `config` describes.
    pub fn of(config: &NodeConfig) -> Self {
        Self {
            vni: config.vtep.vni,
            port: config.vtep.port,
            local: config.underlay.address,
            uplink: config.underlay.interface.clone(),
            mac: config.vtep.mac,
            mtu: config.overlay_mtu(),
            address: config.vtep_address(),
        }
    }
}

/// Another node as the standby path reaches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Peer {
    pub pod_cidr: Ipv4Net,
    pub vtep_ip: Ipv4Addr,
    pub vtep_mac: Mac,
    pub underlay_ip: Ipv4Addr,
}

/// The peers the device should reach.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peers {
    pub peers: BTreeSet<Peer>,
    /// Whether `peers` is every peer there is: only then are others removed from the device.
    pub complete: bool,
}

/// Setting up the standby path failed.
#[derive(Debug, thiserror::Error)]
pub enum StandbyError {
    #[error("netlink: cannot {what}: {message}")]
    Netlink { what: String, message: String },
    #[error("no uplink {0} to carry the standby VXLAN device")]
    NoUplink(String),
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> StandbyError {
    let what = what.into();
    move |e| StandbyError::Netlink {
        what,
        message: e.to_string(),
    }
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io().raw_os_error(),
        _ => None,
    }
}

fn connect() -> Result<Handle, StandbyError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| StandbyError::Netlink {
        what: "open a netlink socket".into(),
        message: e.to_string(),
    })?;
    tokio::spawn(conn);
    Ok(handle)
}

/// The standby path's task; see the module doc.
#[derive(Debug)]
pub struct Standby {
    peers: watch::Sender<Peers>,
    task: JoinHandle<()>,
}

impl Standby {
    /// Start keeping `device` and the peers given with [`Standby::set_peers`] (none at first).
    pub fn spawn(device: Device) -> Self {
        let (peers, rx) = watch::channel(Peers::default());
        let task = tokio::spawn(run(device, rx));
        Self { peers, task }
    }

    /// The peers the device should reach now (applied in the background; a repeat is free).
    pub fn set_peers(&self, peers: Peers) {
        self.peers.send_if_modified(|p| {
            let changed = *p != peers;
            *p = peers;
            changed
        });
    }

    /// Stop the task and remove the device (clean shutdown).
    pub async fn remove(&self) -> Result<(), StandbyError> {
        self.task.abort();
        let h = connect()?;
        if let Some(index) = link_index(&h, IFNAME).await? {
            match h.link().del(index).execute().await {
                Ok(()) => {}
                Err(e) if errno(&e) == Some(libc::ENODEV) => {}
                Err(e) => return Err(nl(format!("delete {IFNAME}"))(e)),
            }
        }
        Ok(())
    }
}

async fn run(device: Device, mut rx: watch::Receiver<Peers>) {
    let mut backoff = Duration::from_millis(250);
    let mut applied: Option<Peers> = None;
    loop {
        let want = rx.borrow_and_update().clone();
        match connect() {
            Ok(h) => match apply(&h, &device, &want).await {
                Ok(()) => {
                    if applied.as_ref() != Some(&want) {
                        tracing::info!(
                            device = IFNAME,
                            peers = want.peers.len(),
                            complete = want.complete,
                            "standby kernel path to other nodes in place"
                        );
                    }
                    applied = Some(want);
                    backoff = Duration::from_millis(250);
                }
                Err(e) => {
                    tracing::warn!("standby kernel path not (fully) in place, retrying: {e}");
                    applied = None;
                }
            },
            Err(e) => tracing::warn!("standby kernel path: {e}"),
        }
        let wait = if applied.is_some() {
            RESYNC
        } else {
            backoff = (backoff * 2).min(RESYNC);
            backoff / 2
        };
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Make the device and its peers what `want` says.
async fn apply(h: &Handle, device: &Device, want: &Peers) -> Result<(), StandbyError> {
    let index = ensure_device(h, device).await?;
    for p in &want.peers {
        add_peer(h, index, p).await?;
    }
    if want.complete {
        prune(h, index, device, &want.peers).await?;
    }
    Ok(())
}

async fn link_index(h: &Handle, name: &str) -> Result<Option<u32>, StandbyError> {
    Ok(link_by_name(h, name).await?.map(|m| m.header.index))
}

async fn link_by_name(
    h: &Handle,
    name: &str,
) -> Result<Option<netlink_packet_route::link::LinkMessage>, StandbyError> {
    let mut links = h.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(m) => Ok(m),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(nl(format!("look up {name}"))(e)),
    }
}

/// What an existing link would have to match to be kept: (VNI, port, local, uplink, learning).
fn vxlan_settings(
    m: &netlink_packet_route::link::LinkMessage,
) -> Option<(u32, u16, Ipv4Addr, u32, bool)> {
    let infos = m.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(i) => Some(i),
        _ => None,
    })?;
    if !infos
        .iter()
        .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Vxlan)))
    {
        return None;
    }
    let data = infos.iter().find_map(|i| match i {
        LinkInfo::Data(InfoData::Vxlan(d)) => Some(d),
        _ => None,
    })?;
    let (mut vni, mut port, mut local, mut link, mut learning) = (None, None, None, None, true);
    for d in data {
        match d {
            InfoVxlan::Id(v) => vni = Some(*v),
            InfoVxlan::Port(p) => port = Some(*p),
            InfoVxlan::Local(a) => local = Some(*a),
            InfoVxlan::Link(l) => link = Some(*l),
            InfoVxlan::Learning(l) => learning = *l,
            _ => {}
        }
    }
    Some((vni?, port?, local?, link?, learning))
}

/// Create the device, or adopt the one an earlier agent left when it has the same tunnel
/// settings (re-created otherwise); set its MAC, MTU, address, and up. Returns its ifindex.
async fn ensure_device(h: &Handle, d: &Device) -> Result<u32, StandbyError> {
    let uplink = link_index(h, &d.uplink)
        .await?
        .ok_or_else(|| StandbyError::NoUplink(d.uplink.clone()))?;
    let wanted = (d.vni, d.port, d.local, uplink, false);
    let existing = link_by_name(h, IFNAME).await?;
    let index = match existing {
        Some(m) if vxlan_settings(&m) == Some(wanted) => m.header.index,
        found => {
            if let Some(m) = found {
                tracing::info!(
                    device = IFNAME,
                    "re-creating the standby device (settings changed)"
                );
                h.link()
                    .del(m.header.index)
                    .execute()
                    .await
                    .map_err(nl(format!("delete {IFNAME}")))?;
            }
            let msg = LinkVxlan::new(IFNAME, d.vni)
                .dev(uplink)
                .port(d.port)
                .local(d.local)
                .learning(false)
                .udp_csum(false)
                .build();
            h.link()
                .add(msg)
                .execute()
                .await
                .map_err(nl(format!("create VXLAN device {IFNAME}")))?;
            // Best effort: without IPv6 the kernel sends nothing of its own into the tunnel.
            let _ = std::fs::write(
                format!("/proc/sys/net/ipv6/conf/{IFNAME}/disable_ipv6"),
                "1",
            );
            link_index(h, IFNAME)
                .await?
                .ok_or_else(|| StandbyError::Netlink {
                    what: format!("find {IFNAME} after creating it"),
                    message: "no such link".into(),
                })?
        }
    };
    h.link()
        .set(
            LinkUnspec::new_with_index(index)
                .address(d.mac.0.to_vec())
                .mtu(d.mtu)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(nl(format!(
            "set MAC {}, MTU {} and up on {IFNAME}",
            d.mac, d.mtu
        )))?;
    match h
        .address()
        .add(index, IpAddr::V4(d.address), 32)
        .execute()
        .await
    {
        Ok(()) => {}
        Err(e) if errno(&e) == Some(libc::EEXIST) => {}
        Err(e) => return Err(nl(format!("add {}/32 to {IFNAME}", d.address))(e)),
    }
    Ok(index)
}

/// Route, neighbor and FDB entry for one peer (each replacing what was there).
async fn add_peer(h: &Handle, index: u32, p: &Peer) -> Result<(), StandbyError> {
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(p.pod_cidr.network(), p.pod_cidr.prefix_len())
        .gateway(p.vtep_ip)
        .output_interface(index)
        .onlink()
        .build();
    h.neighbours()
        .add(index, IpAddr::V4(p.vtep_ip))
        .link_layer_address(&p.vtep_mac.0)
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
        .map_err(nl(format!("add neighbor {} on {IFNAME}", p.vtep_ip)))?;
    h.neighbours()
        .add_bridge(index, &p.vtep_mac.0)
        .destination(IpAddr::V4(p.underlay_ip))
        .flags(NeighbourFlags::Own)
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
        .map_err(nl(format!(
            "add FDB entry {} dst {} on {IFNAME}",
            p.vtep_mac, p.underlay_ip
        )))?;
    h.route()
        .add(route)
        .replace()
        .execute()
        .await
        .map_err(nl(format!(
            "add route {} via {} dev {IFNAME}",
            p.pod_cidr, p.vtep_ip
        )))?;
    Ok(())
}

/// Remove routes, neighbors and FDB entries of the device that no peer of `peers` needs.
async fn prune(
    h: &Handle,
    index: u32,
    device: &Device,
    peers: &BTreeSet<Peer>,
) -> Result<(), StandbyError> {
    let mut routes = h
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    let mut stale = Vec::new();
    while let Some(m) = routes.try_next().await.map_err(nl("list routes"))? {
        let oif = m.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        });
        if oif != Some(index) || m.header.table != RouteHeader::RT_TABLE_MAIN {
            continue;
        }
        let dst = m.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => Some(*d),
            _ => None,
        });
        let wanted = dst.is_some_and(|d| {
            peers.iter().any(|p| {
                p.pod_cidr.network() == d
                    && p.pod_cidr.prefix_len() == m.header.destination_prefix_length
            })
        });
        if !wanted {
            stale.push(m);
        }
    }
    for m in stale {
        h.route()
            .del(m)
            .execute()
            .await
            .map_err(nl(format!("delete a stale route of {IFNAME}")))?;
    }
    for family in [AddressFamily::Inet, AddressFamily::Bridge] {
        let mut neighs = h.neighbours().get().set_address_family(family).execute();
        let mut stale = Vec::new();
        while let Some(m) = neighs.try_next().await.map_err(nl("list neighbors"))? {
            if m.header.ifindex != index {
                continue;
            }
            let wanted = m.attributes.iter().any(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip))
                    if family == AddressFamily::Inet =>
                {
                    peers.iter().any(|p| p.vtep_ip == *ip)
                }
                NeighbourAttribute::LinkLayerAddress(mac) if family == AddressFamily::Bridge => {
                    mac.as_slice() == device.mac.0
                        || peers.iter().any(|p| mac.as_slice() == p.vtep_mac.0)
                }
                _ => false,
            });
            if !wanted {
                stale.push(m);
            }
        }
        for m in stale {
            match h.neighbours().del(m).execute().await {
                Ok(()) => {}
                Err(e) if errno(&e) == Some(libc::ENOENT) => {}
                Err(e) => return Err(nl(format!("delete a stale neighbor of {IFNAME}"))(e)),
            }
        }
    }
    Ok(())
}

/// The peers of a published snapshot.
pub fn peers_of(remotes: &[super::tables::RemoteNode]) -> BTreeSet<Peer> {
    remotes
        .iter()
        .map(|r| Peer {
            pod_cidr: r.pod_cidr,
            vtep_ip: r.vtep_ip,
            vtep_mac: r.vtep_mac,
            underlay_ip: r.underlay_ip,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_follows_the_flannel_conventions() {
        let c: NodeConfig = serde_saphyr::from_str(
            "node_name: a\nunderlay: {interface: up0, address: 192.168.1.1, mtu: 9000}\npod_cidr: 10.244.7.0/24\nvtep: {mac: \"0e:00:00:00:07:00\"}\n",
        )
        .unwrap();
        let d = Device::of(&c);
        assert_eq!((d.vni, d.port), (1, 8472));
        assert_eq!(d.mtu, 8950);
        assert_eq!(d.address, Ipv4Addr::new(10, 244, 7, 0));
        assert_eq!(d.local, Ipv4Addr::new(192, 168, 1, 1));
        assert_eq!(d.mac, "0e:00:00:00:07:00".parse().unwrap());
        assert!(IFNAME.len() < 16, "fits IFNAMSIZ");
    }

    #[tokio::test]
    async fn set_peers_wakes_the_task_only_on_a_change() {
        let (tx, mut rx) = watch::channel(Peers::default());
        let s = Standby {
            peers: tx,
            task: tokio::spawn(async {}),
        };
        rx.borrow_and_update();
        s.set_peers(Peers::default());
        assert!(!rx.has_changed().unwrap());
        let p = Peer {
            pod_cidr: "10.244.2.0/24".parse().unwrap(),
            vtep_ip: Ipv4Addr::new(10, 244, 2, 0),
            vtep_mac: Mac([0x0e, 0, 0, 0, 2, 0]),
            underlay_ip: Ipv4Addr::new(192, 168, 1, 2),
        };
        s.set_peers(Peers {
            peers: [p].into(),
            complete: true,
        });
        assert!(rx.has_changed().unwrap());
    }
}
