//! `sluice-cni`: the CNI plugin that puts pods on the Sluice network.
//!
//! One invocation = one verb (`plugin::run`): it parses the configuration (`config::parse`, safe
//! on any bytes), wires the pod over netlink (`wire`, from sockets opened inside the pod's
//! namespace by `netns`), allocates its address (`ipam`, or a delegated plugin via `delegate`),
//! registers it with the node agent (`agent`), and answers in the caller's `cniVersion`
//! (`result`, `error`).

pub mod agent;
pub mod config;
pub mod delegate;
pub mod env;
pub mod error;
pub mod ipam;
pub mod netns;
pub mod plugin;
pub mod result;
pub mod wire;

/// Bytes VXLAN adds to a packet (outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8).
pub const VXLAN_OVERHEAD: u32 = 50;
/// Underlay MTU assumed when neither the configuration nor the agent says.
pub const DEFAULT_UNDERLAY_MTU: u32 = 1500;
/// Pod interface MTU in routes mode when neither the configuration nor the agent says.
pub const DEFAULT_POD_MTU: u32 = 65535;

/// Test hook: in debug builds, `SLUICE_CNI_CRASH_AT=<name>` makes the plugin SIGKILL itself at
/// that point (`ipam-temporary-written`, `reserved`, `veth-created`, `wired`, `registered`,
/// `committed`), to prove the IPAM state survives. Release builds compile it away.
#[cfg(debug_assertions)]
pub fn crash_point(name: &str) {
    if std::env::var("SLUICE_CNI_CRASH_AT").as_deref() == Ok(name) {
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

/// Test hook (compiled away in release builds).
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn crash_point(_name: &str) {}
