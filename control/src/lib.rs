//! Sluice's control plane: the gRPC contracts in `proto/`, the server (`server`), its storage
//! (`store`), the client library the agent uses (`client`), manifest parsing for `sluicectl`
//! (`manifest`), and the client for the agent's local socket (`agent_client`).
//!
//! See `control/README.md` for the authentication scheme and the commands.

pub mod agent_client;
#[cfg(feature = "control-plane")]
pub mod auth;
#[cfg(feature = "control-plane")]
pub mod client;
#[cfg(feature = "control-plane")]
pub mod flows;
#[cfg(feature = "control-plane")]
pub mod manifest;
#[cfg(feature = "control-plane")]
pub mod metrics;
#[cfg(feature = "control-plane")]
pub mod model;
pub mod observe;
#[cfg(feature = "control-plane")]
pub mod server;
#[cfg(feature = "control-plane")]
pub mod store;

/// The node agent's local API (`proto/agent.proto`), served on the agent's unix socket.
pub mod agent_api {
    tonic::include_proto!("sluice.agent.v1");
}

/// The control plane API (`proto/control.proto`).
#[cfg(feature = "control-plane")]
pub mod api {
    include!(concat!(env!("OUT_DIR"), "/control/sluice.control.v1.rs"));
}
