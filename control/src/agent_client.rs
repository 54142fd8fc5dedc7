//! A client for the node agent's unix-socket API.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::agent_api::agent_client::AgentClient;

/// The agent socket's default path.
pub const DEFAULT_AGENT_SOCKET: &str = "/run/sluice/agent.sock";

/// Connecting to the agent failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach the sluice agent at {}: {source}", path.display())]
pub struct ConnectError {
    pub path: PathBuf,
    #[source]
    pub source: tonic::transport::Error,
}

/// Connect to the agent listening on the unix socket at `path`.
pub async fn connect(path: impl AsRef<Path>) -> Result<AgentClient<Channel>, ConnectError> {
    let path = path.as_ref().to_path_buf();
    let socket = path.clone();
    // The URI is required by tonic but unused: every connection goes to the unix socket.
    let channel = Endpoint::from_static("http://sluice-agent.local")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
        .map_err(|source| ConnectError { path, source })?;
    Ok(AgentClient::new(channel))
}
