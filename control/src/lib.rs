//! Sluice's control plane: the gRPC contracts in `proto/`, and the clients the agent, the CNI
//! plugin and `sluicectl` use.

pub mod agent_client;

/// The node agent's local API (`proto/agent.proto`), served on the agent's unix socket.
pub mod agent_api {
    tonic::include_proto!("sluice.agent.v1");
}
