//! Pod wiring over netlink: the veth pair, the pod's address, routes and gateway neighbor, the
//! host's /32 route and neighbor. Nothing here shells out.
//!
//! Inside the pod: `<ifname>` with `<ip>/32`, a permanent neighbor `169.254.1.1 -> host veth
//! MAC`, and routes via `169.254.1.1 onlink` (each with its own MTU in routes mode), tx checksum
//! offload on (frames leave with partial checksums; the node's dataplane completes them). On the host: `<host veth>` up, `<ip>/32 dev <host veth> scope link`, a permanent
//! neighbor `<ip> -> pod MAC`. Deleting the host veth removes the pair and everything on it.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags};
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteMetric, RouteScope,
};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};

use crate::config::POD_GATEWAY;
use crate::error::{CniError, Code, io};
use crate::netns::{NetnsSockets, PodNetns, set_tx_checksum, tx_checksum};

/// A route in the pod, via the pod gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRoute {
    pub dst: Ipv4Net,
    pub mtu: Option<u32>,
}

/// What to build for one attachment.
#[derive(Debug, Clone)]
pub struct Plan {
    pub host_ifname: String,
    pub ifname: String,
    pub ip: Ipv4Addr,
    /// MTU of both veth ends.
    pub mtu: u32,
    pub routes: Vec<PodRoute>,
}

/// What the kernel gave us.
#[derive(Debug, Clone)]
pub struct Wired {
    pub host_index: u32,
    pub host_mac: Vec<u8>,
    pub pod_index: u32,
    pub pod_mac: Vec<u8>,
}

/// A link's facts.
#[derive(Debug, Clone)]
pub struct LinkFacts {
    pub index: u32,
    pub mac: Vec<u8>,
    pub mtu: u32,
    pub up: bool,
}

fn nl(what: &str, e: rtnetlink::Error) -> CniError {
    io(format!("netlink: cannot {what}: {e}"))
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io().raw_os_error(),
        _ => None,
    }
}

/// The link called `name`, if any.
pub async fn find_link(h: &Handle, name: &str) -> Result<Option<LinkFacts>, CniError> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(m)) => {
            let mut facts = LinkFacts {
                index: m.header.index,
                mac: Vec::new(),
                mtu: 0,
                up: m.header.flags.contains(LinkFlags::Up),
            };
            for a in m.attributes {
                match a {
                    LinkAttribute::Address(mac) => facts.mac = mac,
                    LinkAttribute::Mtu(mtu) => facts.mtu = mtu,
                    _ => {}
                }
            }
            Ok(Some(facts))
        }
        Ok(None) => Ok(None),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(nl(&format!("look up link {name}"), e)),
    }
}

/// Delete the link `name`; returns whether it existed.
pub async fn delete_link(h: &Handle, name: &str) -> Result<bool, CniError> {
    let Some(link) = find_link(h, name).await? else {
        return Ok(false);
    };
    match h.link().del(link.index).execute().await {
        Ok(()) => Ok(true),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(false),
        Err(e) => Err(nl(&format!("delete link {name}"), e)),
    }
}

fn pod_route(dst: Ipv4Net, index: u32, mtu: Option<u32>) -> RouteMessage {
    let mut msg = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst.network(), dst.prefix_len())
        .gateway(POD_GATEWAY)
        .output_interface(index)
        .onlink()
        .build();
    if let Some(mtu) = mtu {
        msg.attributes
            .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(mtu)]));
    }
    msg
}

fn host_route(ip: Ipv4Addr, index: u32) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(ip, 32)
        .output_interface(index)
        .scope(RouteScope::Link)
        .build()
}

/// Build the attachment. On error, whatever was created is left for the caller's rollback
/// (deleting the host veth).
pub async fn wire(
    host: &NetnsSockets,
    pod: &NetnsSockets,
    netns: &PodNetns,
    plan: &Plan,
) -> Result<Wired, CniError> {
    if find_link(&pod.handle, &plan.ifname).await?.is_some() {
        return Err(CniError::new(
            Code::InvalidEnvironment,
            format!(
                "interface {} already exists in network namespace {}; choose another CNI_IFNAME or remove it",
                plan.ifname,
                netns.path().display()
            ),
        ));
    }
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(plan.ifname.clone())
        .mtu(plan.mtu)
        .setns_by_fd(netns.fd())
        .build();
    let veth = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
        .name(plan.host_ifname.clone())
        .mtu(plan.mtu)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    host.handle.link().add(veth).execute().await.map_err(|e| {
        nl(
            &format!("create veth {} <-> {}", plan.host_ifname, plan.ifname),
            e,
        )
    })?;
    crate::crash_point("veth-created");

    let hostl = find_link(&host.handle, &plan.host_ifname)
        .await?
        .ok_or_else(|| io(format!("veth {} vanished after creation", plan.host_ifname)))?;
    let podl = find_link(&pod.handle, &plan.ifname).await?.ok_or_else(|| {
        io(format!(
            "veth peer {} did not arrive in the pod namespace",
            plan.ifname
        ))
    })?;

    host.handle
        .link()
        .set(LinkUnspec::new_with_index(hostl.index).up().build())
        .execute()
        .await
        .map_err(|e| nl(&format!("set {} up", plan.host_ifname), e))?;
    set_tx_checksum(&pod.ioctl, &plan.ifname, true)?;
    pod.handle
        .link()
        .set(LinkUnspec::new_with_index(podl.index).up().build())
        .execute()
        .await
        .map_err(|e| nl(&format!("set {} up in the pod", plan.ifname), e))?;
    pod.handle
        .address()
        .add(podl.index, IpAddr::V4(plan.ip), 32)
        .execute()
        .await
        .map_err(|e| {
            nl(
                &format!("add {}/32 to {} in the pod", plan.ip, plan.ifname),
                e,
            )
        })?;
    pod.handle
        .neighbours()
        .add(podl.index, IpAddr::V4(POD_GATEWAY))
        .link_layer_address(&hostl.mac)
        .state(NeighbourState::Permanent)
        .execute()
        .await
        .map_err(|e| nl(&format!("add neighbor {POD_GATEWAY} in the pod"), e))?;
    for r in &plan.routes {
        pod.handle
            .route()
            .add(pod_route(r.dst, podl.index, r.mtu))
            .execute()
            .await
            .map_err(|e| {
                nl(
                    &format!("add route {} via {POD_GATEWAY} in the pod", r.dst),
                    e,
                )
            })?;
    }
    host.handle
        .route()
        .add(host_route(plan.ip, hostl.index))
        .execute()
        .await
        .map_err(|e| {
            nl(
                &format!("add route {}/32 dev {}", plan.ip, plan.host_ifname),
                e,
            )
        })?;
    host.handle
        .neighbours()
        .add(hostl.index, IpAddr::V4(plan.ip))
        .link_layer_address(&podl.mac)
        .state(NeighbourState::Permanent)
        .execute()
        .await
        .map_err(|e| {
            nl(
                &format!("add neighbor {} on {}", plan.ip, plan.host_ifname),
                e,
            )
        })?;
    Ok(Wired {
        host_index: hostl.index,
        host_mac: hostl.mac,
        pod_index: podl.index,
        pod_mac: podl.mac,
    })
}

struct RouteFacts {
    dst: Ipv4Addr,
    prefix: u8,
    gw: Option<Ipv4Addr>,
    oif: Option<u32>,
    mtu: Option<u32>,
}

async fn routes(h: &Handle) -> Result<Vec<RouteFacts>, CniError> {
    let mut out = Vec::new();
    let mut s = h
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    while let Some(m) = s.try_next().await.map_err(|e| nl("list routes", e))? {
        let mut f = RouteFacts {
            dst: Ipv4Addr::UNSPECIFIED,
            prefix: m.header.destination_prefix_length,
            gw: None,
            oif: None,
            mtu: None,
        };
        for a in m.attributes {
            match a {
                RouteAttribute::Destination(RouteAddress::Inet(d)) => f.dst = d,
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => f.gw = Some(g),
                RouteAttribute::Oif(i) => f.oif = Some(i),
                RouteAttribute::Metrics(ms) => {
                    for x in ms {
                        if let RouteMetric::Mtu(mtu) = x {
                            f.mtu = Some(mtu);
                        }
                    }
                }
                _ => {}
            }
        }
        out.push(f);
    }
    Ok(out)
}

/// Compare the kernel's state with `plan`; every difference is one line of the returned list.
pub async fn check(
    host: &NetnsSockets,
    pod: &NetnsSockets,
    plan: &Plan,
) -> Result<Vec<String>, CniError> {
    let mut drift = Vec::new();
    let Some(podl) = find_link(&pod.handle, &plan.ifname).await? else {
        drift.push(format!("interface {} is missing in the pod", plan.ifname));
        return Ok(drift);
    };
    let Some(hostl) = find_link(&host.handle, &plan.host_ifname).await? else {
        drift.push(format!("host veth {} is missing", plan.host_ifname));
        return Ok(drift);
    };
    if !podl.up {
        drift.push(format!("{} is down in the pod", plan.ifname));
    }
    if !hostl.up {
        drift.push(format!("host veth {} is down", plan.host_ifname));
    }
    if podl.mtu != plan.mtu {
        drift.push(format!(
            "{} has MTU {} instead of {}",
            plan.ifname, podl.mtu, plan.mtu
        ));
    }
    let mut has_addr = false;
    let mut addrs = pod
        .handle
        .address()
        .get()
        .set_link_index_filter(podl.index)
        .execute();
    while let Some(m) = addrs
        .try_next()
        .await
        .map_err(|e| nl("list addresses", e))?
    {
        let a = m
            .attributes
            .iter()
            .any(|a| matches!(a, AddressAttribute::Address(IpAddr::V4(x)) if *x == plan.ip));
        has_addr |= a && m.header.prefix_len == 32;
    }
    if !has_addr {
        drift.push(format!("{} lacks address {}/32", plan.ifname, plan.ip));
    }
    let mut has_neigh = false;
    let mut neighs = pod.handle.neighbours().get().execute();
    while let Some(m) = neighs
        .try_next()
        .await
        .map_err(|e| nl("list neighbors", e))?
    {
        if m.header.ifindex != podl.index || m.header.state != NeighbourState::Permanent {
            continue;
        }
        let dst = m.attributes.iter().any(|a| matches!(a, NeighbourAttribute::Destination(NeighbourAddress::Inet(x)) if *x == POD_GATEWAY));
        let mac = m
            .attributes
            .iter()
            .any(|a| matches!(a, NeighbourAttribute::LinkLayerAddress(x) if *x == hostl.mac));
        has_neigh |= dst && mac;
    }
    if !has_neigh {
        drift.push(format!(
            "permanent neighbor {POD_GATEWAY} -> host veth MAC is missing on {}",
            plan.ifname
        ));
    }
    let pod_routes = routes(&pod.handle).await?;
    for r in &plan.routes {
        let found = pod_routes.iter().find(|f| {
            f.dst == r.dst.network()
                && f.prefix == r.dst.prefix_len()
                && f.oif == Some(podl.index)
                && f.gw == Some(POD_GATEWAY)
        });
        match found {
            None => drift.push(format!(
                "route {} via {POD_GATEWAY} dev {} is missing in the pod",
                r.dst, plan.ifname
            )),
            Some(f) if f.mtu != r.mtu => drift.push(format!(
                "route {} has MTU {:?} instead of {:?}",
                r.dst, f.mtu, r.mtu
            )),
            Some(_) => {}
        }
    }
    if !tx_checksum(&pod.ioctl, &plan.ifname)? {
        drift.push(format!(
            "tx checksum offload is off for {} in the pod",
            plan.ifname
        ));
    }
    let host_routes = routes(&host.handle).await?;
    if !host_routes
        .iter()
        .any(|f| f.dst == plan.ip && f.prefix == 32 && f.oif == Some(hostl.index))
    {
        drift.push(format!(
            "host route {}/32 dev {} is missing",
            plan.ip, plan.host_ifname
        ));
    }
    Ok(drift)
}
