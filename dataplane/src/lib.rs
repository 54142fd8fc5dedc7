//! Sluice's packet pipeline as pure code.
//!
//! Every module is pure: it takes frames (`&mut [u8]` chains), immutable tables and the current
//! time as arguments and returns verdicts. Nothing here makes a system call, reads a clock (the
//! crate's `clippy.toml` bans it), takes a lock or allocates per packet, and nothing is `unsafe`
//! (forbidden crate-wide). All I/O (AF_XDP rings, netlink, gRPC) lives in the node agent
//! (`sluice-agent`) and in `sluice-xdp`. See `README.md` for what lives where.

#![forbid(unsafe_code)]

pub mod checksum;
pub mod coalesce;
pub mod conntrack;
#[cfg(any(test, feature = "testing"))]
pub mod demo;
pub mod events;
pub mod flow;
pub mod frame;
pub mod maglev;
pub mod nat;
pub mod parse;
#[cfg(any(test, feature = "testing"))]
pub mod pcap;
pub mod pipeline;
pub mod policy;
pub mod probe;
pub mod route;
pub mod segment;
pub mod service;
pub mod steer;
pub mod tables;
pub mod trace;
pub mod verdict;
pub mod vxlan;
pub mod wire;
pub mod wordsum;
