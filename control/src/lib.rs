//! Sluice's control plane: the gRPC contracts in `proto/`, the server (`server`), its storage
//! (`store`), the client library the agent uses (`client`), manifest parsing for `sluicectl`
//! (`manifest`), and the client for the agent's local socket (`agent_client`).
//!
//! What gets compiled is chosen by features, so that each consumer builds only what it uses
//! (`control/README.md`, "Features"):
//!
//! - no feature: the node agent's unix-socket API ([`agent_api`], [`agent_client`]), all the CNI
//!   plugin needs;
//! - `client`: the control plane API ([`api`]), the cluster client ([`client`]) and the object
//!   model ([`model`]), flow event filters ([`observe`]) and the metrics exposition ([`metrics`]),
//!   which is what the node agent needs; no store, no etcd client;
//! - `server` (the package's default; includes `client`): the stores (`redb`, `etcd`), the server
//!   with TLS, authentication, the flow relay, manifests, and the binaries `sluice-control` and
//!   `sluicectl`.
//!
//! See `control/README.md` for the authentication scheme and the commands.

pub mod agent_client;
#[cfg(feature = "server")]
pub mod auth;
#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "server")]
pub mod flows;
#[cfg(feature = "kube-mock")]
pub mod kube_mock;
#[cfg(feature = "server")]
pub mod manifest;
#[cfg(feature = "client")]
pub mod metrics;
#[cfg(feature = "client")]
pub mod model;
#[cfg(feature = "client")]
pub mod observe;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod store;
#[cfg(feature = "client")]
pub mod trace;

/// The node agent's local API (`proto/agent.proto`), served on the agent's unix socket.
pub mod agent_api {
    tonic::include_proto!("sluice.agent.v1");
}

/// The control plane API (`proto/control.proto`).
#[cfg(feature = "client")]
pub mod api {
    include!(concat!(env!("OUT_DIR"), "/control/sluice.control.v1.rs"));
}
