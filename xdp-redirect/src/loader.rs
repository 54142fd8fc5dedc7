//! Loading, pinning and attaching the XDP program (control path).
//!
//! One [`XdpLoader`] per node. It mounts bpffs if needed, loads the program
//! with its maps pinned under `<bpffs>/sluice/<node>/maps/` (a restarted
//! agent reuses the pinned maps, so configuration and the per-CPU counters
//! survive), attaches through BPF links pinned under
//! `<bpffs>/sluice/<node>/links/<ifindex>` (a restarted agent swaps the
//! program in the existing link with `bpf_link_update`, so the interface is
//! never without a program), fills the configuration maps, and registers
//! AF_XDP sockets in the XSKMAP. [`XdpLoader::cleanup`] removes every pin.
//!
//! What a previous run left is reconciled on load: links, interface settings
//! and socket slots of interfaces that no longer exist go, and so do slots of
//! interfaces the program does not classify for (transmit-only sockets, whose
//! interface is re-created by every run); [`XdpLoader::retain_interfaces`]
//! lets the caller drop the rest of what is no longer its own.
//!
//! It must not be used on the per-packet path: all calls are syscalls.

use std::collections::{BTreeSet, HashMap};
use std::ffi::CString;
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use libbpf_rs::{Link, MapCore, MapFlags, Object, ObjectBuilder, PrintLevel};

use crate::bpf::{self, bytes_of, from_bytes, maps, types};

/// Default bpffs mount point.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";
/// Directory under the bpffs mount point that holds every node's pins.
pub const PIN_SUBDIR: &str = "sluice";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// An IPv4 prefix, as the classifier matches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Cidr {
    /// Network address (host bits are ignored).
    pub addr: Ipv4Addr,
    /// Prefix length, 0..=32. Length 0 disables the rule.
    pub prefix_len: u8,
}

impl Ipv4Cidr {
    /// A prefix; `None` if `prefix_len > 32`.
    pub fn new(addr: Ipv4Addr, prefix_len: u8) -> Option<Self> {
        (prefix_len <= 32).then_some(Self { addr, prefix_len })
    }

    fn mask(self) -> u32 {
        if self.prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix_len))
        }
    }

    /// (network, mask), both in network byte order as stored in the map.
    fn to_be_pair(self) -> (u32, u32) {
        let mask = self.mask();
        ((u32::from(self.addr) & mask).to_be(), mask.to_be())
    }
}

/// Node-wide classification settings (the `sluice_config` map).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassifierConfig {
    /// Cluster (pod) CIDR: destinations in it are redirected on any interface.
    pub cluster_cidr: Ipv4Cidr,
    /// Service CIDR: destinations in it are redirected on any interface.
    pub service_cidr: Ipv4Cidr,
    /// This node's underlay address (VXLAN and NodePort match only to it).
    pub underlay_addr: Option<Ipv4Addr>,
    /// VXLAN UDP destination port (0 disables the rule).
    pub vxlan_port: u16,
    /// NodePort range (TCP and UDP).
    pub nodeport_range: RangeInclusive<u16>,
    /// Redirect IPv6 (except ICMPv6) arriving on pod interfaces.
    pub redirect_ipv6: bool,
}

impl Default for ClassifierConfig {
    fn default() -> Self {
        Self {
            cluster_cidr: Ipv4Cidr {
                addr: Ipv4Addr::new(10, 244, 0, 0),
                prefix_len: 16,
            },
            service_cidr: Ipv4Cidr {
                addr: Ipv4Addr::new(10, 96, 0, 0),
                prefix_len: 12,
            },
            underlay_addr: None,
            vxlan_port: 8472,
            nodeport_range: 30000..=32767,
            redirect_ipv6: false,
        }
    }
}

impl ClassifierConfig {
    fn to_map_value(&self) -> types::sluice_config {
        let (cluster_net, cluster_mask) = self.cluster_cidr.to_be_pair();
        let (service_net, service_mask) = self.service_cidr.to_be_pair();
        let mut flags = 0;
        if self.redirect_ipv6 {
            flags |= types::sluice_cfg_flags::SLUICE_CFG_REDIRECT_IPV6.0;
        }
        types::sluice_config {
            cluster_net,
            cluster_mask,
            service_net,
            service_mask,
            underlay_addr: self.underlay_addr.map_or(0, |a| u32::from(a).to_be()),
            vxlan_port: self.vxlan_port,
            nodeport_min: *self.nodeport_range.start(),
            nodeport_max: *self.nodeport_range.end(),
            pad: 0,
            flags: types::sluice_cfg_flags(flags),
        }
    }
}

/// What an interface is to the classifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfaceRole {
    /// A pod's host-side veth.
    Pod,
    /// The node's underlay interface (VXLAN and NodePort rules apply).
    Uplink,
}

/// Per-interface classifier settings (the `sluice_ifaces` map).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IfaceConfig {
    /// Pod or uplink.
    pub role: IfaceRole,
    /// Without a registered socket, drop matched frames instead of passing
    /// them to the kernel (a pod isolated by policy must fail closed).
    pub fail_closed: bool,
    /// Pod: redirect every IPv4 frame, not only cluster traffic (its egress
    /// policy also governs outside and host addresses).
    pub redirect_all: bool,
}

impl IfaceConfig {
    fn to_map_value(self) -> types::sluice_iface {
        types::sluice_iface {
            role: match self.role {
                IfaceRole::Pod => types::sluice_role::SLUICE_ROLE_POD,
                IfaceRole::Uplink => types::sluice_role::SLUICE_ROLE_UPLINK,
            },
            flags: types::sluice_iface_flags(
                if self.fail_closed {
                    types::sluice_iface_flags::SLUICE_IF_FAIL_CLOSED.0
                } else {
                    0
                } | if self.redirect_all {
                    types::sluice_iface_flags::SLUICE_IF_REDIRECT_ALL.0
                } else {
                    0
                },
            ),
        }
    }
}

/// In which directions NetworkPolicy isolates a local pod (the `sluice_isolated` map). Consulted
/// only when no socket takes a frame, i.e. while the agent is gone: frames to an ingress-isolated
/// pod are then dropped on every interface instead of being delivered by the kernel without
/// policy. (Egress isolation is enforced through the pod interface's `fail_closed`.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Isolation {
    /// Some policy selects the pod for ingress.
    pub ingress: bool,
    /// Some policy selects the pod for egress.
    pub egress: bool,
}

impl Isolation {
    fn to_map_value(self) -> u32 {
        let mut v = 0;
        if self.ingress {
            v |= types::sluice_isolated_flags::SLUICE_ISOLATED_INGRESS.0;
        }
        if self.egress {
            v |= types::sluice_isolated_flags::SLUICE_ISOLATED_EGRESS.0;
        }
        v
    }

    fn from_map_value(v: u32) -> Self {
        Self {
            ingress: v & types::sluice_isolated_flags::SLUICE_ISOLATED_INGRESS.0 != 0,
            egress: v & types::sluice_isolated_flags::SLUICE_ISOLATED_EGRESS.0 != 0,
        }
    }
}

/// How the program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttachMode {
    /// Driver (native) mode; fails if the driver has no XDP support.
    #[default]
    Native,
    /// Generic (SKB) mode: the explicit fallback, slower, logged.
    Generic,
}

/// Where the loader pins and what node it serves.
#[derive(Debug, Clone)]
pub struct LoaderOptions {
    /// Node name: pins go to `<bpffs>/sluice/<node>/`.
    pub node: String,
    /// bpffs mount point (mounted if it is not bpffs yet).
    pub bpffs: PathBuf,
}

impl LoaderOptions {
    /// Options for `node` with the default bpffs mount point.
    pub fn new(node: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            bpffs: PathBuf::from(DEFAULT_BPFFS),
        }
    }

    /// `<bpffs>/sluice/<node>`.
    pub fn pin_dir(&self) -> PathBuf {
        self.bpffs.join(PIN_SUBDIR).join(&self.node)
    }
}

/// Control-path errors, carrying what an operator needs to act.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The node name cannot be a directory name.
    #[error("invalid node name {node:?}: must be non-empty, without '/' and not '.' or '..'")]
    InvalidNode {
        /// The name given.
        node: String,
    },
    /// bpffs could not be mounted.
    #[error("mounting bpffs at {path}: {source}")]
    MountBpffs {
        /// Mount point.
        path: PathBuf,
        /// Cause.
        #[source]
        source: nix::Error,
    },
    /// A pin directory or file could not be created or removed.
    #[error("pin path {path}: {source}")]
    PinDir {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Opening or loading the object failed (verifier log attached).
    #[error("loading the XDP program failed: {source}\nverifier/libbpf log:\n{verifier_log}")]
    Load {
        /// Cause.
        #[source]
        source: libbpf_rs::Error,
        /// What libbpf and the verifier printed during the load.
        verifier_log: String,
    },
    /// The object lacks a map or program the loader expects.
    #[error("the BPF object has no {0}")]
    Missing(&'static str),
    /// No interface of that name.
    #[error("interface {ifname}: {source}")]
    NoSuchInterface {
        /// Interface name.
        ifname: String,
        /// Cause.
        #[source]
        source: nix::Error,
    },
    /// Attaching to (or updating the link of) an interface failed.
    #[error("attaching XDP to {ifname} (ifindex {ifindex}, {mode:?} mode): {source}")]
    Attach {
        /// Interface name.
        ifname: String,
        /// Interface index.
        ifindex: u32,
        /// Mode asked for.
        mode: AttachMode,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Querying the program attached to an interface failed.
    #[error("querying the XDP program of ifindex {ifindex}: {source}")]
    Query {
        /// Interface index.
        ifindex: u32,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Detaching from an interface failed.
    #[error("detaching XDP from ifindex {ifindex}: {source}")]
    Detach {
        /// Interface index.
        ifindex: u32,
        /// Cause.
        #[source]
        source: libbpf_rs::Error,
    },
    /// A map update, lookup or delete failed.
    #[error("map {map}: {op}: {source}")]
    Map {
        /// Map name.
        map: &'static str,
        /// What was attempted.
        op: &'static str,
        /// Cause.
        #[source]
        source: libbpf_rs::Error,
    },
    /// Every XSKMAP slot is in use.
    #[error("all {0} XSKMAP slots are in use")]
    SlotsExhausted(u32),
    /// A map value had an unexpected size.
    #[error("map {0} returned a value of unexpected size")]
    BadValue(&'static str),
}

/// Frames per classification result, summed over all CPUs.
pub type Counters = types::sluice_counters;

/// The node's XDP program: loaded once, pinned, attached to interfaces.
#[derive(Debug)]
pub struct XdpLoader {
    obj: Object,
    pin_dir: PathBuf,
    slots: HashMap<(u32, u32), u32>,
    slot_capacity: u32,
}

static LOAD_LOG: Mutex<String> = Mutex::new(String::new());

fn capture_log(_level: PrintLevel, msg: String) {
    if let Ok(mut log) = LOAD_LOG.lock() {
        log.push_str(&msg);
    }
}

fn pin_io(path: &Path) -> impl FnOnce(io::Error) -> LoaderError + '_ {
    move |source| LoaderError::PinDir {
        path: path.to_path_buf(),
        source,
    }
}

/// Mounts bpffs at `path` unless it is bpffs already.
pub fn ensure_bpffs(path: &Path) -> Result<(), LoaderError> {
    fs::create_dir_all(path).map_err(pin_io(path))?;
    if let Ok(st) = nix::sys::statfs::statfs(path)
        && st.filesystem_type().0 == BPF_FS_MAGIC
    {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| LoaderError::MountBpffs {
        path: path.to_path_buf(),
        source,
    })
}

/// The ifindex of `ifname` in the caller's network namespace.
pub fn ifindex(ifname: &str) -> Result<u32, LoaderError> {
    nix::net::if_::if_nametoindex(ifname).map_err(|source| LoaderError::NoSuchInterface {
        ifname: ifname.to_string(),
        source,
    })
}

/// Whether an interface with this index exists in the caller's network
/// namespace. (nix 0.31's `if_indextoname` answers `Ok("")` for an unknown
/// index instead of an error: an empty name counts as none.)
pub fn interface_exists(ifindex: u32) -> bool {
    nix::net::if_::if_indextoname(ifindex).is_ok_and(|name| !name.is_empty())
}

/// What a reconcile of the pinned state removed (see
/// [`XdpLoader::retain_interfaces`]), each list sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Ifindexes whose pinned link was detached and unpinned.
    pub links: Vec<u32>,
    /// Ifindexes whose `sluice_ifaces` entry was removed.
    pub ifaces: Vec<u32>,
    /// (ifindex, queue) pairs whose `sluice_xsk_slots` entry and XSKMAP slot
    /// were freed.
    pub slots: Vec<(u32, u32)>,
}

impl Pruned {
    /// Whether nothing was removed.
    pub fn is_empty(&self) -> bool {
        self.links.is_empty() && self.ifaces.is_empty() && self.slots.is_empty()
    }
}

impl XdpLoader {
    /// Loads the program for `opts.node`, reusing maps pinned by an earlier
    /// run (or pinning new ones), and drops what that run left for
    /// interfaces that are gone (see [`XdpLoader::retain_interfaces`]).
    pub fn load(opts: &LoaderOptions) -> Result<Self, LoaderError> {
        let node = opts.node.as_str();
        if node.is_empty() || node.contains('/') || node == "." || node == ".." {
            return Err(LoaderError::InvalidNode {
                node: node.to_string(),
            });
        }
        ensure_bpffs(&opts.bpffs)?;
        let pin_dir = opts.pin_dir();
        for dir in [pin_dir.join("maps"), pin_dir.join("links")] {
            fs::create_dir_all(&dir).map_err(pin_io(&dir))?;
        }

        let load = || -> libbpf_rs::Result<Object> {
            let mut open = ObjectBuilder::default().open_memory(bpf::OBJECT)?;
            for mut map in open.maps_mut() {
                let name = map.name().to_string_lossy().into_owned();
                if maps::ALL.contains(&name.as_str()) {
                    // libbpf reuses a compatible pinned map or creates and
                    // pins a new one at this path during load.
                    map.set_pin_path(pin_dir.join("maps").join(name))?;
                }
            }
            open.load()
        };
        let previous = libbpf_rs::set_print(Some((PrintLevel::Info, capture_log)));
        if let Ok(mut log) = LOAD_LOG.lock() {
            log.clear();
        }
        let loaded = load();
        libbpf_rs::set_print(previous);
        let obj = loaded.map_err(|source| LoaderError::Load {
            source,
            verifier_log: LOAD_LOG
                .lock()
                .map(|mut l| std::mem::take(&mut *l))
                .unwrap_or_default(),
        })?;

        let mut loader = Self {
            obj,
            pin_dir,
            slots: HashMap::new(),
            slot_capacity: 0,
        };
        loader.slot_capacity = loader.map(maps::XSKS)?.max_entries();
        // A restarted agent inherits the slot assignments of the pinned map.
        let slots_map = loader.map(maps::XSK_SLOTS)?;
        let mut slots = HashMap::new();
        for key in slots_map.keys() {
            let Some(k) = from_bytes::<types::sluice_xsk_key>(&key) else {
                continue;
            };
            if let Ok(Some(v)) = slots_map.lookup(&key, MapFlags::ANY)
                && let Some(slot) = from_bytes::<u32>(&v)
            {
                slots.insert((k.ifindex, k.queue), slot);
            }
        }
        loader.slots = slots;
        // A pod deleted while no agent ran, or the previous run's punt link (re-created with a
        // new ifindex), would otherwise keep its entries, and its slot numbers, for good.
        // Best effort: what cannot be removed now is harmless to this run.
        match loader.retain_interfaces(interface_exists) {
            Ok(p) if p.is_empty() => {}
            Ok(p) => {
                tracing::info!(pruned = ?p, "pinned state of interfaces that are gone removed")
            }
            Err(e) => tracing::warn!("cannot remove the pinned state of gone interfaces: {e}"),
        }
        tracing::info!(pin_dir = %loader.pin_dir.display(), "XDP program loaded");
        Ok(loader)
    }

    /// Keeps only the interfaces `keep` accepts: every other interface's
    /// pinned link is detached and unpinned, its `sluice_ifaces` entry and its
    /// socket slots removed (as [`XdpLoader::detach`] does). Slots of kept
    /// interfaces that have no `sluice_ifaces` entry are freed too: the
    /// program never looks them up (it classifies only configured
    /// interfaces), so they belong to transmit-only sockets, which need no
    /// slot. Returns what was removed.
    pub fn retain_interfaces(&mut self, keep: impl Fn(u32) -> bool) -> Result<Pruned, LoaderError> {
        let links = self.attached()?;
        let ifaces = self.configured()?;
        let slots: BTreeSet<(u32, u32)> = self.slots.keys().copied().collect();
        let gone: BTreeSet<u32> = links
            .iter()
            .chain(&ifaces)
            .chain(slots.iter().map(|(i, _)| i))
            .copied()
            .filter(|i| !keep(*i))
            .collect();
        let mut pruned = Pruned {
            links: links.iter().copied().filter(|i| gone.contains(i)).collect(),
            ifaces: ifaces
                .iter()
                .copied()
                .filter(|i| gone.contains(i))
                .collect(),
            slots: slots
                .iter()
                .copied()
                .filter(|(i, _)| gone.contains(i) || !ifaces.contains(i))
                .collect(),
        };
        for ifindex in &gone {
            self.detach(*ifindex)?;
        }
        for (ifindex, queue) in &pruned.slots {
            if !gone.contains(ifindex) {
                self.unregister_socket(*ifindex, *queue)?;
            }
        }
        pruned.links.sort_unstable();
        pruned.ifaces.sort_unstable();
        Ok(pruned)
    }

    /// Ifindexes configured in `sluice_ifaces`, sorted.
    pub fn configured(&self) -> Result<Vec<u32>, LoaderError> {
        let mut out: Vec<u32> = self
            .map(maps::IFACES)?
            .keys()
            .filter_map(|k| from_bytes::<u32>(&k))
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    /// The socket slot assignments, (ifindex, queue) -> XSKMAP slot, sorted.
    pub fn slots(&self) -> Vec<((u32, u32), u32)> {
        let mut out: Vec<_> = self.slots.iter().map(|(k, v)| (*k, *v)).collect();
        out.sort_unstable();
        out
    }

    /// `<bpffs>/sluice/<node>`.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    fn map(&self, name: &'static str) -> Result<libbpf_rs::Map<'_>, LoaderError> {
        self.obj
            .maps()
            .find(|m| m.name() == name)
            .ok_or(LoaderError::Missing(name))
    }

    /// The loaded XDP program (for `test_run` and inspection).
    pub fn program(&self) -> Result<libbpf_rs::Program<'_>, LoaderError> {
        self.obj
            .progs()
            .find(|p| p.name() == bpf::PROGRAM)
            .ok_or(LoaderError::Missing("program sluice_xdp"))
    }

    fn update<K: bpf::Pod, V: bpf::Pod>(
        &self,
        name: &'static str,
        key: &K,
        value: &V,
    ) -> Result<(), LoaderError> {
        self.map(name)?
            .update(bytes_of(key), bytes_of(value), MapFlags::ANY)
            .map_err(|source| LoaderError::Map {
                map: name,
                op: "update",
                source,
            })
    }

    fn delete<K: bpf::Pod>(&self, name: &'static str, key: &K) -> Result<(), LoaderError> {
        match self.map(name)?.delete(bytes_of(key)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(LoaderError::Map {
                map: name,
                op: "delete",
                source,
            }),
        }
    }

    /// Writes the node-wide classification settings.
    pub fn set_config(&self, cfg: &ClassifierConfig) -> Result<(), LoaderError> {
        self.update(maps::CONFIG, &0u32, &cfg.to_map_value())
    }

    /// Sets (or changes) how the classifier treats `ifindex`, without
    /// touching the attachment.
    pub fn set_iface(&self, ifindex: u32, iface: IfaceConfig) -> Result<(), LoaderError> {
        self.update(maps::IFACES, &ifindex, &iface.to_map_value())
    }

    fn link_pin(&self, ifindex: u32) -> PathBuf {
        self.pin_dir.join("links").join(ifindex.to_string())
    }

    /// Attaches the program to `ifname` (or atomically replaces the program
    /// in its pinned link from an earlier run, keeping that link's mode) and
    /// configures the interface. Returns the ifindex.
    pub fn attach(
        &self,
        ifname: &str,
        iface: IfaceConfig,
        mode: AttachMode,
    ) -> Result<u32, LoaderError> {
        let ifindex = ifindex(ifname)?;
        self.set_iface(ifindex, iface)?;
        let prog = self.program()?;
        let pin = self.link_pin(ifindex);
        let attach_err = |source: io::Error| LoaderError::Attach {
            ifname: ifname.to_string(),
            ifindex,
            mode,
            source,
        };
        if pin.exists() {
            match Link::open(&pin).and_then(|mut link| link.update_prog(&prog)) {
                Ok(()) => {
                    tracing::info!(
                        ifname,
                        ifindex,
                        "XDP link from an earlier run updated in place"
                    );
                    return Ok(ifindex);
                }
                Err(e) => {
                    // Defunct link (interface recreated) or a stale pin.
                    tracing::warn!(ifname, ifindex, error = %e, "stale XDP link pin replaced");
                    fs::remove_file(&pin).map_err(pin_io(&pin))?;
                }
            }
        }
        let flags = match mode {
            AttachMode::Native => libbpf_rs::libbpf_sys::XDP_FLAGS_DRV_MODE,
            AttachMode::Generic => {
                tracing::warn!(ifname, ifindex, "attaching XDP in generic (SKB) mode");
                libbpf_rs::libbpf_sys::XDP_FLAGS_SKB_MODE
            }
        };
        let link = create_xdp_link(prog.as_fd(), ifindex, flags).map_err(attach_err)?;
        pin_fd(link.as_fd(), &pin).map_err(attach_err)?;
        tracing::info!(ifname, ifindex, ?mode, "XDP attached");
        Ok(ifindex)
    }

    /// Detaches the program from `ifindex`, forgets its configuration and
    /// its socket slots, and removes the link pin.
    pub fn detach(&mut self, ifindex: u32) -> Result<(), LoaderError> {
        let pin = self.link_pin(ifindex);
        if pin.exists() {
            let link =
                Link::open(&pin).map_err(|source| LoaderError::Detach { ifindex, source })?;
            // A defunct link (interface gone) reports an error; the pin goes
            // either way.
            if let Err(e) = link.detach() {
                tracing::debug!(ifindex, error = %e, "detaching a defunct XDP link");
            }
            fs::remove_file(&pin).map_err(pin_io(&pin))?;
        }
        let queues: Vec<u32> = self
            .slots
            .keys()
            .filter(|(i, _)| *i == ifindex)
            .map(|(_, q)| *q)
            .collect();
        for q in queues {
            self.unregister_socket(ifindex, q)?;
        }
        self.delete(maps::IFACES, &ifindex)
    }

    /// Puts the AF_XDP socket `fd` in the XSKMAP for frames arriving on
    /// (`ifindex`, `queue`). Returns its slot. Replaces an earlier socket of
    /// the same (interface, queue).
    pub fn register_socket(
        &mut self,
        ifindex: u32,
        queue: u32,
        fd: BorrowedFd<'_>,
    ) -> Result<u32, LoaderError> {
        let slot = match self.slots.get(&(ifindex, queue)) {
            Some(s) => *s,
            None => (0..self.slot_capacity)
                .find(|s| !self.slots.values().any(|v| v == s))
                .ok_or(LoaderError::SlotsExhausted(self.slot_capacity))?,
        };
        let raw: u32 = fd
            .as_raw_fd()
            .try_into()
            .map_err(|_| LoaderError::BadValue("xsks"))?;
        self.update(maps::XSKS, &slot, &raw)?;
        let key = types::sluice_xsk_key { ifindex, queue };
        self.update(maps::XSK_SLOTS, &key, &slot)?;
        self.slots.insert((ifindex, queue), slot);
        Ok(slot)
    }

    /// Removes the socket of (`ifindex`, `queue`); its frames fall back per
    /// the interface's fail-open/fail-closed setting.
    pub fn unregister_socket(&mut self, ifindex: u32, queue: u32) -> Result<(), LoaderError> {
        let key = types::sluice_xsk_key { ifindex, queue };
        self.delete(maps::XSK_SLOTS, &key)?;
        if let Some(slot) = self.slots.remove(&(ifindex, queue)) {
            self.delete(maps::XSKS, &slot)?;
        }
        Ok(())
    }

    /// The classification counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, LoaderError> {
        let per_cpu = self
            .map(maps::COUNTERS)?
            .lookup_percpu(bytes_of(&0u32), MapFlags::ANY)
            .map_err(|source| LoaderError::Map {
                map: maps::COUNTERS,
                op: "lookup",
                source,
            })?
            .unwrap_or_default();
        let mut sum = Counters::default();
        for bytes in per_cpu {
            let c: Counters = from_bytes(&bytes).ok_or(LoaderError::BadValue(maps::COUNTERS))?;
            sum.match_cluster += c.match_cluster;
            sum.match_service += c.match_service;
            sum.match_vxlan += c.match_vxlan;
            sum.match_nodeport += c.match_nodeport;
            sum.match_ipv6 += c.match_ipv6;
            sum.match_all += c.match_all;
            sum.redirected += c.redirected;
            sum.pass_no_socket += c.pass_no_socket;
            sum.drop_no_socket += c.drop_no_socket;
            sum.pass_unknown_iface += c.pass_unknown_iface;
            sum.pass_non_ip += c.pass_non_ip;
            sum.pass_ipv6 += c.pass_ipv6;
            sum.pass_other += c.pass_other;
            sum.pass_malformed += c.pass_malformed;
        }
        Ok(sum)
    }

    /// The classifier settings of `ifindex`, if it is configured.
    pub fn iface(&self, ifindex: u32) -> Result<Option<IfaceConfig>, LoaderError> {
        let value = self
            .map(maps::IFACES)?
            .lookup(bytes_of(&ifindex), MapFlags::ANY)
            .map_err(|source| LoaderError::Map {
                map: maps::IFACES,
                op: "lookup",
                source,
            })?;
        let Some(bytes) = value else { return Ok(None) };
        let v: types::sluice_iface =
            from_bytes(&bytes).ok_or(LoaderError::BadValue(maps::IFACES))?;
        let role = if v.role == types::sluice_role::SLUICE_ROLE_UPLINK {
            IfaceRole::Uplink
        } else {
            IfaceRole::Pod
        };
        let fail_closed = v.flags.0 & types::sluice_iface_flags::SLUICE_IF_FAIL_CLOSED.0 != 0;
        let redirect_all = v.flags.0 & types::sluice_iface_flags::SLUICE_IF_REDIRECT_ALL.0 != 0;
        Ok(Some(IfaceConfig {
            role,
            fail_closed,
            redirect_all,
        }))
    }

    /// Records how policy isolates the local pod at `addr`; a pod isolated in no direction is
    /// removed from the map.
    pub fn set_isolation(&self, addr: Ipv4Addr, isolation: Isolation) -> Result<(), LoaderError> {
        let key = u32::from_ne_bytes(addr.octets());
        if isolation == Isolation::default() {
            self.delete(maps::ISOLATED, &key)
        } else {
            self.update(maps::ISOLATED, &key, &isolation.to_map_value())
        }
    }

    /// Every isolated local pod in the map (what a restarted agent inherits).
    pub fn isolated(&self) -> Result<Vec<(Ipv4Addr, Isolation)>, LoaderError> {
        let map = self.map(maps::ISOLATED)?;
        let mut out = Vec::new();
        for key in map.keys() {
            let Some(k) = from_bytes::<u32>(&key) else {
                continue;
            };
            if let Ok(Some(v)) = map.lookup(&key, MapFlags::ANY)
                && let Some(v) = from_bytes::<u32>(&v)
            {
                out.push((
                    Ipv4Addr::from(k.to_ne_bytes()),
                    Isolation::from_map_value(v),
                ));
            }
        }
        out.sort_by_key(|(a, _)| *a);
        Ok(out)
    }

    /// Removes the classifier settings of `ifindex` (its frames then pass).
    pub fn clear_iface(&self, ifindex: u32) -> Result<(), LoaderError> {
        self.delete(maps::IFACES, &ifindex)
    }

    /// The kernel id of the loaded program.
    pub fn program_id(&self) -> Result<u32, LoaderError> {
        libbpf_rs::Program::id_from_fd(self.program()?.as_fd()).map_err(|source| {
            LoaderError::Load {
                source,
                verifier_log: String::new(),
            }
        })
    }

    /// Runs one frame through the program with `BPF_PROG_TEST_RUN` as if it
    /// arrived on (`ifindex`, `rx_queue`) and returns the XDP action
    /// (`XDP_DROP` 1, `XDP_PASS` 2, `XDP_REDIRECT` 4). Frames larger than a
    /// page exercise the multi-buffer (frags) path. The interface must
    /// exist in the caller's network namespace.
    pub fn test_run(&self, frame: &[u8], ifindex: u32, rx_queue: u32) -> Result<u32, LoaderError> {
        let ctx = types::xdp_md {
            data: 0,
            data_end: frame.len() as u32,
            data_meta: 0,
            ingress_ifindex: ifindex,
            rx_queue_index: rx_queue,
            egress_ifindex: 0,
        };
        let mut ctx_bytes = bytes_of(&ctx).to_vec();
        let prog = self
            .obj
            .progs_mut()
            .find(|p| p.name() == bpf::PROGRAM)
            .ok_or(LoaderError::Missing("program sluice_xdp"))?;
        let input = libbpf_rs::ProgramInput {
            context_in: Some(&mut ctx_bytes),
            data_in: Some(frame),
            ..Default::default()
        };
        let out = prog.test_run(input).map_err(|source| LoaderError::Map {
            map: "(BPF_PROG_TEST_RUN)",
            op: "test_run",
            source,
        })?;
        Ok(out.return_value)
    }

    /// Ifindexes with a pinned link of this node.
    pub fn attached(&self) -> Result<Vec<u32>, LoaderError> {
        let dir = self.pin_dir.join("links");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(pin_io(&dir))? {
            let entry = entry.map_err(pin_io(&dir))?;
            if let Some(i) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
                out.push(i);
            }
        }
        Ok(out)
    }

    /// Clean shutdown: detaches every link of this node and removes every
    /// pin and the node's pin directory.
    pub fn cleanup(mut self) -> Result<(), LoaderError> {
        for ifindex in self.attached()? {
            self.detach(ifindex)?;
        }
        for name in maps::ALL {
            let path = self.pin_dir.join("maps").join(name);
            if path.exists() {
                fs::remove_file(&path).map_err(pin_io(&path))?;
            }
        }
        for dir in [
            self.pin_dir.join("maps"),
            self.pin_dir.join("links"),
            self.pin_dir.clone(),
        ] {
            if dir.exists() {
                fs::remove_dir(&dir).map_err(pin_io(&dir))?;
            }
        }
        // The shared parent goes too once the last node has left.
        if let Some(parent) = self.pin_dir.parent() {
            let _ = fs::remove_dir(parent);
        }
        tracing::info!(pin_dir = %self.pin_dir.display(), "XDP pins removed");
        Ok(())
    }
}

/// The id of the XDP program attached to `ifindex` in `mode` (`None` if
/// there is none).
pub fn attached_program_id(ifindex: u32, mode: AttachMode) -> Result<Option<u32>, LoaderError> {
    let flags = match mode {
        AttachMode::Native => libbpf_rs::libbpf_sys::XDP_FLAGS_DRV_MODE,
        AttachMode::Generic => libbpf_rs::libbpf_sys::XDP_FLAGS_SKB_MODE,
    };
    let mut id = 0u32;
    // SAFETY: `id` is a live u32 the call writes to.
    let rc =
        unsafe { libbpf_rs::libbpf_sys::bpf_xdp_query_id(ifindex as i32, flags as i32, &mut id) };
    if rc < 0 {
        return Err(LoaderError::Query {
            ifindex,
            source: io::Error::from_raw_os_error(-rc),
        });
    }
    Ok((id != 0).then_some(id))
}

fn create_xdp_link(prog: BorrowedFd<'_>, ifindex: u32, flags: u32) -> io::Result<OwnedFd> {
    let opts = libbpf_rs::libbpf_sys::bpf_link_create_opts {
        sz: size_of::<libbpf_rs::libbpf_sys::bpf_link_create_opts>() as _,
        flags,
        ..Default::default()
    };
    // SAFETY: `prog` is a valid program fd for the duration of the call and
    // `opts` is a properly sized, initialised options struct.
    let fd = unsafe {
        libbpf_rs::libbpf_sys::bpf_link_create(
            prog.as_raw_fd(),
            ifindex as i32,
            libbpf_rs::libbpf_sys::BPF_XDP,
            &opts,
        )
    };
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(-fd));
    }
    // SAFETY: bpf_link_create returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn pin_fd(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `fd` is valid for the call and `c` is a NUL-terminated path.
    let rc = unsafe { libbpf_rs::libbpf_sys::bpf_obj_pin(fd.as_raw_fd(), c.as_ptr()) };
    if rc < 0 {
        return Err(io::Error::from_raw_os_error(-rc));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_exists_tells_a_gone_index() {
        assert!(interface_exists(1), "lo is 1 in every network namespace");
        assert!(!interface_exists(u32::MAX));
        assert!(!interface_exists(0));
    }

    #[test]
    fn cidr_masks_are_network_order() {
        let c = Ipv4Cidr::new(Ipv4Addr::new(10, 244, 3, 9), 16).unwrap();
        let (net, mask) = c.to_be_pair();
        assert_eq!(net.to_ne_bytes(), [10, 244, 0, 0]);
        assert_eq!(mask.to_ne_bytes(), [255, 255, 0, 0]);
        assert_eq!(
            Ipv4Cidr::new(Ipv4Addr::UNSPECIFIED, 0)
                .unwrap()
                .to_be_pair(),
            (0, 0)
        );
        assert!(Ipv4Cidr::new(Ipv4Addr::UNSPECIFIED, 33).is_none());
    }

    #[test]
    fn bad_node_names_are_rejected() {
        for node in ["", "a/b", ".", ".."] {
            let mut o = LoaderOptions::new(node);
            o.bpffs = PathBuf::from("/nonexistent-slx");
            assert!(matches!(
                XdpLoader::load(&o),
                Err(LoaderError::InvalidNode { .. })
            ));
        }
    }
}
