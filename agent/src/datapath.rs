//! The agent's side of the XDP program: load it (pinned under the node's bpffs directory), attach
//! it to interfaces, detach, and remove the pins on clean shutdown.
//!
//! [`Datapath`] is the boundary the agent calls; [`XdpDatapath`] implements it over
//! `sluice-xdp`'s loader. [`ControlOnly`] serves control-path tests (`--no-datapath`: interfaces
//! are resolved, nothing is attached) and [`Unavailable`] makes every attach fail with a reason.
//!
//! The loader is shared (behind a mutex, never taken per packet) with the workers, which register
//! the AF_XDP sockets they open in the XSKMAP themselves (see `xsk_io`).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use sluice_xdp::{
    AttachMode, ClassifierConfig, IfaceConfig, IfaceRole, Ipv4Cidr, Isolation, LoaderOptions,
    XdpLoader,
};

use super::config::NodeConfig;

/// The loader shared by the agent thread and the workers (`None` before load and after unload).
pub type SharedLoader = Arc<Mutex<Option<XdpLoader>>>;

/// Loading or attaching the XDP program failed.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("no interface named {0} in this network namespace")]
    NoSuchInterface(String),
    #[error("the XDP datapath is not available in this build: {0}")]
    Unavailable(&'static str),
    #[error("cannot {what} on {ifname}: {source}")]
    Loader {
        what: &'static str,
        ifname: String,
        #[source]
        source: sluice_xdp::LoaderError,
    },
    #[error("cannot {what} on {ifname}: the XDP program is not loaded")]
    NotLoaded { what: &'static str, ifname: String },
    #[error("cannot {what} on {ifname}: a thread panicked holding the XDP loader")]
    Poisoned { what: &'static str, ifname: String },
}

/// What the agent needs from the XDP program's loader.
pub trait Datapath: Send + Sync + Debug {
    /// Load the program and its maps (replacing pinned ones left by a previous agent) and
    /// configure them from `config`.
    fn load(&self, config: &NodeConfig) -> Result<(), DatapathError>;
    /// Attach the program to `ifname` (replacing an existing attachment) as a pod veth or the
    /// uplink; returns its ifindex.
    fn attach(&self, ifname: &str, role: Role) -> Result<u32, DatapathError>;
    /// Detach from an interface (gone interfaces are fine).
    fn detach(&self, ifname: &str, ifindex: u32) -> Result<(), DatapathError>;
    /// Keep the pinned state (links, interface settings, socket slots) of the interfaces in
    /// `keep` only: what an earlier agent left for anything else (a pod deleted while no agent
    /// ran, an AddPod cut short, its punt link) goes. Called after [`Datapath::load`], before
    /// anything is attached.
    fn retain_interfaces(&self, _keep: &[u32]) -> Result<(), DatapathError> {
        Ok(())
    }
    /// `Ok` when the program is loaded and attached to the uplink.
    fn ready(&self) -> Result<(), String>;
    /// Number of rx queues of the uplink.
    fn uplink_queues(&self, ifname: &str) -> u32 {
        rx_queue_count(ifname)
    }
    /// Remove links, maps and pins (clean shutdown).
    fn unload(&self, config: &NodeConfig);
    /// The XDP classifier's counters by name (frames redirected, passed and why), if loaded.
    fn classifier_counters(&self) -> BTreeMap<String, u64> {
        BTreeMap::new()
    }
    /// Mirror NetworkPolicy isolation of the local pods into the XDP program, so that while no
    /// worker is there (agent killed) frames of isolated pods are dropped rather than delivered by
    /// the kernel without policy: an egress-isolated pod's veth turns fail-closed, an
    /// ingress-isolated pod's address goes into the isolated map (checked on every interface).
    /// `pods` is the complete set: pods not in it lose their isolation entries.
    fn sync_isolation(&self, _pods: &[PodIsolation]) -> Result<(), DatapathError> {
        Ok(())
    }
}

/// A local pod and how policy isolates it (see [`Datapath::sync_isolation`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodIsolation {
    pub ifindex: u32,
    pub ip: std::net::Ipv4Addr,
    pub isolation: sluice_dataplane::policy::Isolation,
}

/// The ifindex of `ifname` in the current network namespace.
pub fn ifindex(ifname: &str) -> Result<u32, DatapathError> {
    nix::net::if_::if_nametoindex(ifname)
        .map_err(|_| DatapathError::NoSuchInterface(ifname.to_owned()))
}

/// The MAC of `ifname` in the current network namespace (from sysfs).
pub fn mac_of(ifname: &str) -> Result<super::config::Mac, DatapathError> {
    std::fs::read_to_string(format!("/sys/class/net/{ifname}/address"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| DatapathError::NoSuchInterface(ifname.to_owned()))
}

/// Rx queues of an interface, from sysfs (1 when unknown).
pub fn rx_queue_count(ifname: &str) -> u32 {
    let dir = format!("/sys/class/net/{ifname}/queues");
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
                .count()
        })
        .ok()
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| *n > 0)
        .unwrap_or(1)
}

/// What an interface is to the datapath.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Pod,
    Uplink,
}

/// The name of drop reason index `i` for the counters export: the pipeline's [`DropReason`]
/// names, then the agent's own ([`AgentDrop`]).
///
/// [`DropReason`]: sluice_dataplane::verdict::DropReason
pub fn drop_reason_name(i: u8) -> String {
    use sluice_dataplane::verdict::DropReason;
    let i = usize::from(i);
    if let Some(r) = DropReason::ALL.get(i) {
        return r.as_str().to_owned();
    }
    AgentDrop::ALL
        .get(i - DropReason::COUNT)
        .map_or_else(|| format!("reason-{i}"), |r| r.as_str().to_owned())
}

pub use super::drops::AgentDrop;

/// No XDP datapath in this build: the agent serves its API but cannot wire pods.
#[derive(Debug, Default)]
pub struct Unavailable;

const WHY: &str = "this agent was started without an XDP datapath";

impl Datapath for Unavailable {
    fn load(&self, _: &NodeConfig) -> Result<(), DatapathError> {
        Ok(())
    }
    fn attach(&self, _: &str, _: Role) -> Result<u32, DatapathError> {
        Err(DatapathError::Unavailable(WHY))
    }
    fn detach(&self, _: &str, _: u32) -> Result<(), DatapathError> {
        Ok(())
    }
    fn ready(&self) -> Result<(), String> {
        Err(WHY.to_owned())
    }
    fn unload(&self, _: &NodeConfig) {}
}

/// Control path only (`--no-datapath`): interfaces are looked up, nothing is attached.
#[derive(Debug, Default)]
pub struct ControlOnly;

impl Datapath for ControlOnly {
    fn load(&self, _: &NodeConfig) -> Result<(), DatapathError> {
        Ok(())
    }
    fn attach(&self, ifname: &str, _: Role) -> Result<u32, DatapathError> {
        ifindex(ifname)
    }
    fn detach(&self, _: &str, _: u32) -> Result<(), DatapathError> {
        Ok(())
    }
    fn ready(&self) -> Result<(), String> {
        Err("the agent runs without a datapath (--no-datapath)".to_owned())
    }
    fn unload(&self, _: &NodeConfig) {}
}

/// The XDP program of `sluice-xdp`, pinned under `<bpffs>/sluice/<node>`.
#[derive(Debug)]
pub struct XdpDatapath {
    loader: SharedLoader,
    mode: AttachMode,
}

impl XdpDatapath {
    /// `generic`: attach in SKB mode (the explicit, logged fallback).
    pub fn new(generic: bool) -> Self {
        Self {
            loader: Arc::new(Mutex::new(None)),
            mode: if generic {
                AttachMode::Generic
            } else {
                AttachMode::Native
            },
        }
    }

    /// The loader, for the workers to register their sockets.
    pub fn loader(&self) -> SharedLoader {
        self.loader.clone()
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut XdpLoader) -> Result<T, sluice_xdp::LoaderError>,
        what: &'static str,
        ifname: &str,
    ) -> Result<T, DatapathError> {
        with_loader(&self.loader, what, ifname, f)
    }
}

/// Run `f` on the shared loader (`what` on `ifname` names the operation in the error).
pub fn with_loader<T>(
    loader: &SharedLoader,
    what: &'static str,
    ifname: &str,
    f: impl FnOnce(&mut XdpLoader) -> Result<T, sluice_xdp::LoaderError>,
) -> Result<T, DatapathError> {
    let mut guard = loader.lock().map_err(|_| DatapathError::Poisoned {
        what,
        ifname: ifname.to_owned(),
    })?;
    let loader = guard.as_mut().ok_or_else(|| DatapathError::NotLoaded {
        what,
        ifname: ifname.to_owned(),
    })?;
    f(loader).map_err(|source| DatapathError::Loader {
        what,
        ifname: ifname.to_owned(),
        source,
    })
}

fn cidr(n: ipnet::Ipv4Net) -> Ipv4Cidr {
    Ipv4Cidr {
        addr: n.network(),
        prefix_len: n.prefix_len(),
    }
}

impl Datapath for XdpDatapath {
    fn load(&self, config: &NodeConfig) -> Result<(), DatapathError> {
        let err = |source: sluice_xdp::LoaderError| DatapathError::Loader {
            what: "load the XDP program",
            ifname: config.underlay.interface.clone(),
            source,
        };
        let bpffs = config.paths.bpffs.clone();
        let opts = LoaderOptions {
            node: config.node_name.clone(),
            bpffs,
        };
        let loader = XdpLoader::load(&opts).map_err(err)?;
        loader
            .set_config(&ClassifierConfig {
                cluster_cidr: cidr(config.cluster_cidr),
                service_cidr: cidr(config.service_cidr),
                underlay_addr: Some(config.underlay.address),
                vxlan_port: config.vtep.port,
                nodeport_range: config.node_port_range.0..=config.node_port_range.1,
                redirect_ipv6: false,
            })
            .map_err(err)?;
        if let Ok(mut g) = self.loader.lock() {
            *g = Some(loader);
        }
        Ok(())
    }

    fn attach(&self, ifname: &str, role: Role) -> Result<u32, DatapathError> {
        let iface = IfaceConfig {
            role: match role {
                Role::Pod => IfaceRole::Pod,
                Role::Uplink => IfaceRole::Uplink,
            },
            fail_closed: false,
            redirect_all: false,
        };
        let mode = self.mode;
        self.with(|l| l.attach(ifname, iface, mode), "attach XDP", ifname)
    }

    fn detach(&self, ifname: &str, ifindex: u32) -> Result<(), DatapathError> {
        self.with(|l| l.detach(ifindex), "detach XDP", ifname)
    }

    fn retain_interfaces(&self, keep: &[u32]) -> Result<(), DatapathError> {
        let pruned = self.with(
            |l| l.retain_interfaces(|i| keep.contains(&i)),
            "remove the pinned state of interfaces that are not the agent's",
            "",
        )?;
        if !pruned.is_empty() {
            tracing::info!(
                ?pruned,
                "pinned state of interfaces that are not the agent's removed"
            );
        }
        Ok(())
    }

    fn ready(&self) -> Result<(), String> {
        match self.loader.lock() {
            Ok(g) if g.is_some() => Ok(()),
            _ => Err("the XDP program is not loaded".into()),
        }
    }

    fn classifier_counters(&self) -> BTreeMap<String, u64> {
        let Ok(g) = self.loader.lock() else {
            return BTreeMap::new();
        };
        let Some(c) = g.as_ref().and_then(|l| l.counters().ok()) else {
            return BTreeMap::new();
        };
        [
            ("match_cluster", c.match_cluster),
            ("match_service", c.match_service),
            ("match_vxlan", c.match_vxlan),
            ("match_nodeport", c.match_nodeport),
            ("match_ipv6", c.match_ipv6),
            ("match_all", c.match_all),
            ("redirected", c.redirected),
            ("pass_no_socket", c.pass_no_socket),
            ("drop_no_socket", c.drop_no_socket),
            ("pass_unknown_iface", c.pass_unknown_iface),
            ("pass_non_ip", c.pass_non_ip),
            ("pass_ipv6", c.pass_ipv6),
            ("pass_other", c.pass_other),
            ("pass_malformed", c.pass_malformed),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    fn sync_isolation(&self, pods: &[PodIsolation]) -> Result<(), DatapathError> {
        self.with(
            |l| {
                for (ip, _) in l.isolated()? {
                    if !pods.iter().any(|p| p.ip == ip) {
                        l.set_isolation(ip, Isolation::default())?;
                    }
                }
                for p in pods {
                    l.set_isolation(
                        p.ip,
                        Isolation {
                            ingress: p.isolation.ingress,
                            egress: p.isolation.egress,
                        },
                    )?;
                    let want = IfaceConfig {
                        role: IfaceRole::Pod,
                        fail_closed: p.isolation.egress,
                        redirect_all: p.isolation.egress,
                    };
                    // Only pods whose veth carries the program (a pod being detached has none).
                    if let Some(have) = l.iface(p.ifindex)?
                        && have != want
                    {
                        l.set_iface(p.ifindex, want)?;
                    }
                }
                Ok(())
            },
            "mirror policy isolation",
            "",
        )
    }

    fn unload(&self, _: &NodeConfig) {
        let loader = self.loader.lock().ok().and_then(|mut g| g.take());
        if let Some(l) = loader
            && let Err(e) = l.cleanup()
        {
            tracing::warn!("removing XDP links and pins: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_resolves_and_garbage_does_not() {
        assert_eq!(ifindex("lo").unwrap(), 1);
        assert!(matches!(
            ifindex("no-such-if-xyz"),
            Err(DatapathError::NoSuchInterface(_))
        ));
        assert_eq!(rx_queue_count("no-such-if-xyz"), 1);
        assert!(Unavailable.attach("lo", Role::Pod).is_err());
        assert_eq!(drop_reason_name(0), "truncated");
        assert_eq!(drop_reason_name(AgentDrop::NoSocket.index()), "no_socket");
        assert!(Unavailable.ready().is_err());
    }
}
