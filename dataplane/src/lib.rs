//! Sluice's dataplane.
//!
//! The pipeline modules are pure: they take frames (`&mut [u8]` chains), immutable tables and the
//! current time as arguments and return verdicts. They make no system calls, read no clock, take no
//! lock and allocate nothing per packet; all I/O (AF_XDP rings, netlink, gRPC) lives in the agent
//! and in `sluice-xdp`.

#[cfg(feature = "agent")]
pub mod agent;
pub mod checksum;
pub mod coalesce;
pub mod conntrack;
pub mod demo;
pub mod events;
pub mod frame;
pub mod maglev;
pub mod nat;
pub mod parse;
pub mod pcap;
pub mod pipeline;
pub mod policy;
pub mod route;
pub mod segment;
pub mod service;
pub mod steer;
pub mod tables;
pub mod verdict;
pub mod vxlan;
pub mod wire;
pub mod wordsum;
