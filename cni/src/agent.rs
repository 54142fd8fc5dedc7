//! Calls to the node agent over its unix socket, each bounded by a timeout. Every failure to
//! reach or use the agent is CNI code 11 (try again later): the runtime retries the ADD.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sluice_control::agent_api::agent_client::AgentClient;
use sluice_control::agent_api::{
    AddPodRequest, DelPodRequest, NodeInfoRequest, NodeInfoResponse, StatusRequest, StatusResponse,
};
use tonic::transport::Channel;

use crate::error::{CniError, again};

/// A connected agent.
pub struct Agent {
    client: AgentClient<Channel>,
    timeout: Duration,
    path: PathBuf,
}

impl Agent {
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, CniError> {
        let connect = sluice_control::agent_client::connect(path);
        let client = tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| again(format!("the sluice agent at {} did not accept a connection within {timeout:?}; is sluice-agent running?", path.display())))?
            .map_err(|e| again(format!("{e}; is sluice-agent running on this node?")))?;
        Ok(Self {
            client,
            timeout,
            path: path.to_path_buf(),
        })
    }

    fn failed(&self, call: &str, e: impl std::fmt::Display) -> CniError {
        again(format!(
            "the sluice agent at {} failed {call}: {e}",
            self.path.display()
        ))
    }

    async fn bounded<T>(
        &self,
        call: &str,
        f: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, CniError> {
        match tokio::time::timeout(self.timeout, f).await {
            Err(_) => Err(self.failed(call, format!("no answer within {:?}", self.timeout))),
            Ok(Err(status)) => {
                Err(self.failed(call, format!("{}: {}", status.code(), status.message())))
            }
            Ok(Ok(r)) => Ok(r.into_inner()),
        }
    }

    pub async fn node_info(&mut self) -> Result<NodeInfoResponse, CniError> {
        let mut c = self.client.clone();
        self.bounded("NodeInfo", c.node_info(NodeInfoRequest {}))
            .await
    }

    pub async fn add_pod(&mut self, req: AddPodRequest) -> Result<(), CniError> {
        let mut c = self.client.clone();
        self.bounded("AddPod", c.add_pod(req)).await.map(|_| ())
    }

    pub async fn del_pod(&mut self, container_id: &str, ifname: &str) -> Result<bool, CniError> {
        let mut c = self.client.clone();
        let req = DelPodRequest {
            container_id: container_id.to_string(),
            ifname: ifname.to_string(),
        };
        self.bounded("DelPod", c.del_pod(req))
            .await
            .map(|r| r.existed)
    }

    pub async fn status(&mut self) -> Result<StatusResponse, CniError> {
        let mut c = self.client.clone();
        self.bounded("Status", c.status(StatusRequest {})).await
    }
}
