//! The node configuration of the standalone agent.
//!
//! One file (YAML, or JSON when its name ends in `.json`) describes this node, its underlay, its
//! peers, the manifests that stand in for the Kubernetes API, the workers and the paths the agent
//! uses. Every path is overridable so several agents run side by side on one machine, each in its
//! own network namespace. Loading validates the whole file once; the rest of the agent trusts it.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// The default agent socket.
pub const DEFAULT_SOCKET: &str = "/run/sluice/agent.sock";
/// The default state directory (pod registry, counters).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/sluice";
/// The default bpffs mount point; the node's objects are pinned under `<this>/sluice/<node name>`.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";
/// VXLAN overhead on an IPv4 underlay (outer Ethernet is not counted in the MTU): IPv4 20 + UDP 8 +
/// VXLAN 8 + inner Ethernet 14.
pub const VXLAN_OVERHEAD: u32 = 50;

pub use sluice_dataplane::wire::ethernet::{Mac, MacParseError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's name (as the Kubernetes Node object would have it).
    pub node_name: String,
    pub underlay: Underlay,
    /// This node's pod CIDR, e.g. `10.244.1.0/24`. May be omitted with a `control` section: the
    /// control plane leases it at registration (until then it reads [`UNLEASED_POD_CIDR`]).
    #[serde(default = "unleased_pod_cidr")]
    pub pod_cidr: Ipv4Net,
    #[serde(default = "default_cluster_cidr")]
    pub cluster_cidr: Ipv4Net,
    #[serde(default = "default_service_cidr")]
    pub service_cidr: Ipv4Net,
    /// Inclusive NodePort range.
    #[serde(default = "default_node_port_range")]
    pub node_port_range: (u16, u16),
    /// MTU of pod interfaces and of the route to this node's own pod CIDR.
    #[serde(default = "default_pod_mtu")]
    pub pod_mtu: u32,
    pub vtep: Vtep,
    #[serde(default)]
    pub peers: Vec<PeerNode>,
    #[serde(default)]
    pub manifests: Manifests,
    #[serde(default)]
    pub workers: WorkerConfig,
    #[serde(default)]
    pub paths: Paths,
    /// The control plane to follow (absent: standalone, manifests only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<ControlConfig>,
    /// Where to serve Prometheus metrics (`GET /metrics`), e.g. `127.0.0.1:9090`; none if unset.
    #[serde(default)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Masquerade of pod traffic leaving the cluster (on unless turned off).
    #[serde(default)]
    pub masquerade: MasqueradeConfig,
    /// The most pods this node runs (kubelet's `maxPods`, 110 by default): every worker's UMEM is
    /// sized so that each of them keeps a fill share (see `xsk_io::UmemPlan`).
    #[serde(default = "default_max_pods")]
    pub max_pods: u32,
}

fn default_max_pods() -> u32 {
    110
}

/// Pod traffic to addresses outside the cluster leaves with the node's address as its source
/// (Calico's `natOutgoing`, Cilium's `enableIPv4Masquerade`); see [`crate::masquerade`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MasqueradeConfig {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Destinations reached with the pod's own address besides the cluster and service CIDRs,
    /// which are never masqueraded (Cilium's `nonMasqueradeCIDRs`), e.g. a routed datacenter
    /// network that knows the pod CIDRs.
    #[serde(default)]
    pub exclude: Vec<Ipv4Net>,
}

impl Default for MasqueradeConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            exclude: Vec::new(),
        }
    }
}

/// `pod_cidr` of a config that leaves it to the control plane (`0.0.0.0/32`, never a real one).
pub const UNLEASED_POD_CIDR: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::UNSPECIFIED, 32);

fn unleased_pod_cidr() -> Ipv4Net {
    UNLEASED_POD_CIDR
}

/// How to reach `sluice-control` (see `control/README.md`, "The agent's side").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// `https://host:port` of the control plane's TLS endpoint.
    pub endpoint: String,
    /// CA certificate (PEM) that signed the server's certificate.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// File holding this node's bearer token.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Name to verify in the server's certificate (default: the endpoint's host).
    #[serde(default)]
    pub tls_domain: Option<String>,
}

/// This node's underlay (uplink) interface.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Underlay {
    /// The uplink interface name, e.g. `eth0`.
    pub interface: String,
    /// This node's underlay address (the VXLAN source and destination).
    pub address: Ipv4Addr,
    #[serde(default = "default_underlay_mtu")]
    pub mtu: u32,
    /// MAC of the uplink interface itself; read from the interface when absent.
    #[serde(default)]
    pub mac: Option<Mac>,
    /// Next hops on the underlay for destinations that are not peer nodes (e.g. a gateway).
    #[serde(default)]
    pub next_hops: Vec<NextHop>,
}

/// A neighbor on the underlay reachable through the uplink.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NextHop {
    pub address: Ipv4Addr,
    pub mac: Mac,
}

/// This node's VXLAN endpoint, Flannel-compatible: VNI 1, port 8472, address `10.244.N.0`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vtep {
    /// The inner source MAC of encapsulated frames (Flannel's `flannel.1` MAC).
    pub mac: Mac,
    /// The VTEP address; the network address of the pod CIDR when absent.
    #[serde(default)]
    pub address: Option<Ipv4Addr>,
    #[serde(default = "default_vni")]
    pub vni: u32,
    #[serde(default = "default_vxlan_port")]
    pub port: u16,
}

/// Another node of the cluster (Sluice or kernel Flannel: they look the same on the wire).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerNode {
    pub name: String,
    pub underlay_ip: Ipv4Addr,
    /// The peer's underlay MAC (outer destination MAC when it is on the same segment).
    pub underlay_mac: Mac,
    pub pod_cidr: Ipv4Net,
    /// The peer's VTEP MAC (inner destination MAC).
    pub vtep_mac: Mac,
}

/// Manifest files standing in for the Kubernetes API in standalone mode. Each file holds one or
/// more YAML documents (or a `List`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifests {
    #[serde(default)]
    pub services: Vec<PathBuf>,
    #[serde(default)]
    pub endpoint_slices: Vec<PathBuf>,
    #[serde(default)]
    pub network_policies: Vec<PathBuf>,
    #[serde(default)]
    pub namespaces: Vec<PathBuf>,
}

/// How frames are bound to AF_XDP sockets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BindMode {
    /// Copy mode: works on every driver, required on veth.
    #[default]
    Copy,
    /// Zero-copy: needs driver support; all sockets on one UMEM share the mode.
    ZeroCopy,
}

/// Worker threads and their queues.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// Uplink rx queue -> CPU core of the worker owning that queue's socket. Empty: one worker per
    /// uplink queue on cores 0, 1, ... (the uplink's queue count is read at start).
    #[serde(default)]
    pub queues: BTreeMap<u32, usize>,
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    #[serde(default)]
    pub busy_poll: bool,
    /// After a round that handled frames, keep polling (without sleeping) this many microseconds
    /// before waiting on the sockets again: the next frames of a burst are found without a
    /// wake-up (OVS's `pmd-sleep-max` idea). 0: sleep as soon as a round finds nothing. Spinning
    /// costs the core it runs on; worth it when the worker has a core of its own.
    #[serde(default)]
    pub idle_spin_us: u32,
    /// After a round that forwarded frames to a pod of this node, give the core to any other
    /// runnable thread (`sched_yield`, one per round, not per frame). Off by default: under
    /// EEVDF each yield pushes the worker's deadline a whole slice back, so a worker that yields
    /// often loses its core to whatever else runs there. With pods on the worker's core it
    /// helped (64-byte UDP at kernel VXLAN's load in `scripts/bench.sh`, shared layout: 0.05 %
    /// lost, kernel VXLAN 0.41 %), but with the two nodes' workers sharing a core (dedicated
    /// layout) the yielding one starved and the unthrottled flood fell from 345 to 45 kpps.
    /// `slice_us` gets most of the gain without that.
    #[serde(default)]
    pub yield_to_pods: bool,
    /// The worker threads' time slice in microseconds under the fair scheduler (EEVDF's custom
    /// slice, Linux 6.12 and later; 0: the kernel's default, a few milliseconds). A worker sharing
    /// its core with pods otherwise keeps it for a whole default slice while it delivers into
    /// their sockets, and a pod's application that cannot run meanwhile overflows its receive
    /// buffer. With 100 us, 64-byte UDP at kernel VXLAN's load lost 0.43 % (kernel VXLAN
    /// 0.33 %) in the shared layout and 0.12 % in the dedicated one, and the unthrottled flood
    /// moved 256 and 317 kpps (0.91x and 2.32x kernel VXLAN); with the default slice 0.53 %
    /// (kernel 0.30 %), 245 and 334 kpps. Ignored for SCHED_FIFO workers.
    #[serde(default = "default_slice_us")]
    pub slice_us: u32,
    #[serde(default)]
    pub bind_mode: BindMode,
    /// Whether to pin workers to their cores (off lets many agents share a small machine).
    #[serde(default = "default_true")]
    pub pin: bool,
}

fn default_slice_us() -> u32 {
    100
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            queues: BTreeMap::new(),
            batch_size: default_batch_size(),
            busy_poll: false,
            idle_spin_us: 0,
            yield_to_pods: false,
            slice_us: default_slice_us(),
            bind_mode: BindMode::Copy,
            pin: true,
        }
    }
}

/// Where the agent keeps its socket, state and pinned BPF objects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Paths {
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// bpffs mount point (mounted there if it is not bpffs yet); the node's objects live in
    /// `<bpffs>/sluice/<node_name>`.
    #[serde(default = "default_bpffs")]
    pub bpffs: PathBuf,
}

impl Default for Paths {
    fn default() -> Self {
        Self {
            socket: default_socket(),
            state_dir: default_state_dir(),
            bpffs: default_bpffs(),
        }
    }
}

fn default_cluster_cidr() -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(10, 244, 0, 0), 16).expect("valid prefix")
}
fn default_service_cidr() -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(10, 96, 0, 0), 12).expect("valid prefix")
}
fn default_node_port_range() -> (u16, u16) {
    (30000, 32767)
}
fn default_pod_mtu() -> u32 {
    65535
}
fn default_underlay_mtu() -> u32 {
    1500
}
fn default_vni() -> u32 {
    1
}
fn default_vxlan_port() -> u16 {
    8472
}
fn default_batch_size() -> u32 {
    64
}
fn default_true() -> bool {
    true
}
fn default_socket() -> PathBuf {
    DEFAULT_SOCKET.into()
}
fn default_state_dir() -> PathBuf {
    DEFAULT_STATE_DIR.into()
}
fn default_bpffs() -> PathBuf {
    DEFAULT_BPFFS.into()
}

/// The configuration could not be read or is inconsistent.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read node config {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("node config {} is not valid: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("node config is inconsistent: {0}")]
    Invalid(String),
}

impl NodeConfig {
    /// Read and validate the config at `path` (JSON when the name ends in `.json`, else YAML).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str::<Self>(&text).map_err(|e| e.to_string())
        } else {
            serde_saphyr::from_str::<Self>(&text).map_err(|e| e.to_string())
        }
        .map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Check what serde cannot: addresses inside their ranges, sizes in bounds, no overlaps.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.node_name.is_empty() || self.node_name.contains('/') {
            return bad(format!(
                "node_name {:?} must be non-empty without '/'",
                self.node_name
            ));
        }
        if self.pod_cidr == UNLEASED_POD_CIDR {
            if self.control.is_none() {
                return bad("pod_cidr is required without a control section".into());
            }
        } else if !self.cluster_cidr.contains(&self.pod_cidr) {
            return bad(format!(
                "pod_cidr {} is outside cluster_cidr {}",
                self.pod_cidr, self.cluster_cidr
            ));
        }
        if self.underlay.mtu < 576 + VXLAN_OVERHEAD || self.underlay.mtu > 65535 {
            return bad(format!("underlay mtu {} out of range", self.underlay.mtu));
        }
        if self.pod_mtu < 576 || self.pod_mtu > 65535 {
            return bad(format!("pod_mtu {} out of range", self.pod_mtu));
        }
        if self.max_pods == 0 || self.max_pods > 2048 {
            return bad(format!("max_pods {} must be 1..=2048", self.max_pods));
        }
        if self.workers.batch_size == 0 || self.workers.batch_size > 4096 {
            return bad(format!(
                "workers.batch_size {} must be 1..=4096",
                self.workers.batch_size
            ));
        }
        let (lo, hi) = self.node_port_range;
        if lo > hi {
            return bad(format!("node_port_range {lo}..{hi} is empty"));
        }
        let mut seen = vec![(self.node_name.as_str(), self.pod_cidr)];
        for peer in &self.peers {
            if !self.cluster_cidr.contains(&peer.pod_cidr) {
                return bad(format!(
                    "peer {} pod_cidr {} is outside cluster_cidr {}",
                    peer.name, peer.pod_cidr, self.cluster_cidr
                ));
            }
            for (name, cidr) in &seen {
                if *name == peer.name {
                    return bad(format!("node name {name} appears twice"));
                }
                if cidr.contains(&peer.pod_cidr) || peer.pod_cidr.contains(cidr) {
                    return bad(format!(
                        "peer {} pod_cidr {} overlaps {name}'s {cidr}",
                        peer.name, peer.pod_cidr
                    ));
                }
            }
            seen.push((&peer.name, peer.pod_cidr));
        }
        Ok(())
    }

    /// This node's VTEP address (`10.244.N.0` for pod CIDR `10.244.N.0/24` unless configured).
    pub fn vtep_address(&self) -> Ipv4Addr {
        self.vtep.address.unwrap_or(self.pod_cidr.network())
    }

    /// MTU for traffic to other nodes' pods (the underlay MTU minus the VXLAN overhead).
    pub fn overlay_mtu(&self) -> u32 {
        self.underlay.mtu - VXLAN_OVERHEAD
    }

    /// The directory holding this node's pinned BPF objects.
    pub fn bpf_pin_dir(&self) -> PathBuf {
        self.paths.bpffs.join("sluice").join(&self.node_name)
    }

    /// The persisted pod registry.
    pub fn registry_path(&self) -> PathBuf {
        self.paths.state_dir.join("pods.json")
    }

    /// The counters file, rewritten about once a second.
    pub fn counters_path(&self) -> PathBuf {
        self.paths.state_dir.join("counters.json")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = r#"
node_name: node-a
underlay:
  interface: up0
  address: 192.168.50.1
pod_cidr: 10.244.1.0/24
vtep:
  mac: "0e:00:00:00:01:00"
peers:
  - name: node-b
    underlay_ip: 192.168.50.2
    underlay_mac: "0e:00:00:00:02:01"
    pod_cidr: 10.244.2.0/24
    vtep_mac: "0e:00:00:00:02:00"
workers:
  queues: {0: 0, 1: 1}
paths:
  socket: /tmp/x/agent.sock
  state_dir: /tmp/x/state
"#;

    #[test]
    fn yaml_config_loads_with_defaults() {
        let c: NodeConfig = serde_saphyr::from_str(YAML).unwrap();
        c.validate().unwrap();
        assert_eq!(c.vtep_address(), Ipv4Addr::new(10, 244, 1, 0));
        assert_eq!(c.vtep.vni, 1);
        assert_eq!(c.vtep.port, 8472);
        assert_eq!(c.overlay_mtu(), 1450);
        assert_eq!(c.workers.batch_size, 64);
        assert_eq!(c.workers.queues.get(&1), Some(&1));
        assert_eq!(c.bpf_pin_dir(), PathBuf::from("/sys/fs/bpf/sluice/node-a"));
        assert_eq!(c.peers[0].vtep_mac, "0e:00:00:00:02:00".parse().unwrap());
    }

    #[test]
    fn json_round_trip() {
        let c: NodeConfig = serde_saphyr::from_str(YAML).unwrap();
        let j = serde_json::to_string(&c).unwrap();
        let back: NodeConfig = serde_json::from_str(&j).unwrap();
        assert_eq!(c, back);
    }

    #[test]
    fn overlapping_peer_is_rejected() {
        let mut c: NodeConfig = serde_saphyr::from_str(YAML).unwrap();
        c.peers[0].pod_cidr = "10.244.1.0/25".parse().unwrap();
        assert!(matches!(c.validate(), Err(ConfigError::Invalid(_))));
    }

    #[test]
    fn bad_macs_do_not_parse() {
        for s in [
            "",
            "0e:00",
            "0e:00:00:00:00:00:00",
            "zz:00:00:00:00:00",
            "0e:0:00:00:00:000",
        ] {
            assert!(s.parse::<Mac>().is_err(), "{s}");
        }
        assert!(Mac::try_from(&[1u8, 2, 3][..]).is_err());
    }
}
