//! The agent's side of the XDP program: load it (pinned under the node's bpffs directory), attach
//! it to interfaces, detach, and remove the pins on clean shutdown.
//!
//! [`Datapath`] is the boundary the agent calls; the implementation over `sluice-xdp`'s loader
//! goes here when that crate is in the workspace. Until then the agent runs either with
//! [`Unavailable`] (every attach fails with the reason, Status is not ready) or, for control-path
//! tests, [`ControlOnly`] (interfaces are resolved, nothing is attached).

use std::fmt::Debug;

use super::config::NodeConfig;

/// Loading or attaching the XDP program failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DatapathError {
    #[error("no interface named {0} in this network namespace")]
    NoSuchInterface(String),
    #[error("the XDP datapath is not available in this build: {0}")]
    Unavailable(&'static str),
    #[error("cannot {what} on {ifname}: {message}")]
    Attach {
        what: &'static str,
        ifname: String,
        message: String,
    },
}

/// What the agent needs from the XDP program's loader.
pub trait Datapath: Send + Sync + Debug {
    /// Load the program and its maps (replacing pinned ones left by a previous agent) and
    /// configure them from `config`.
    fn load(&self, config: &NodeConfig) -> Result<(), DatapathError>;
    /// Attach the program to `ifname` (replacing an existing attachment); returns its ifindex.
    fn attach(&self, ifname: &str) -> Result<u32, DatapathError>;
    /// Detach from an interface (gone interfaces are fine).
    fn detach(&self, ifname: &str, ifindex: u32) -> Result<(), DatapathError>;
    /// `Ok` when the program is loaded and attached to the uplink.
    fn ready(&self) -> Result<(), String>;
    /// Number of rx queues of the uplink.
    fn uplink_queues(&self, ifname: &str) -> u32 {
        rx_queue_count(ifname)
    }
    /// Remove links, maps and pins (clean shutdown).
    fn unload(&self, config: &NodeConfig);
}

/// The ifindex of `ifname` in the current network namespace.
pub fn ifindex(ifname: &str) -> Result<u32, DatapathError> {
    nix::net::if_::if_nametoindex(ifname)
        .map_err(|_| DatapathError::NoSuchInterface(ifname.to_owned()))
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

/// The name of drop reason index `i` for the counters export.
pub fn drop_reason_name(i: u8) -> String {
    format!("reason-{i}")
}

/// No XDP datapath in this build: the agent serves its API but cannot wire pods.
#[derive(Debug, Default)]
pub struct Unavailable;

const WHY: &str = "sluice-xdp (XDP program, loader, AF_XDP sockets) is not integrated yet";

impl Datapath for Unavailable {
    fn load(&self, _: &NodeConfig) -> Result<(), DatapathError> {
        Ok(())
    }
    fn attach(&self, _: &str) -> Result<u32, DatapathError> {
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
    fn attach(&self, ifname: &str) -> Result<u32, DatapathError> {
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
        assert!(Unavailable.attach("lo").is_err());
        assert!(Unavailable.ready().is_err());
    }
}
