//! The agent's local gRPC API (`control/proto/agent.proto`, service `Agent`) on its unix socket.
//!
//! The socket is created mode 0600 (root only), replacing a stale one left by a killed agent, and
//! removed when [`serve`] returns. Requests are validated here and mapped to gRPC status codes a
//! person can act on: bad input is `InvalidArgument`, a missing datapath `Unavailable`.

use std::collections::BTreeMap;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sluice_control::agent_api::agent_server::{Agent as AgentService, AgentServer};
use sluice_control::agent_api::{
    AddPodRequest, AddPodResponse, DelPodRequest, DelPodResponse, NodeInfoRequest,
    NodeInfoResponse, ObserveRequest, StatusRequest, StatusResponse, TraceRequest, TraceResponse,
};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

use super::config::Mac;
use super::registry::{PodPort, PodRecord};
use super::{Agent, AgentError};

/// The gRPC service over a running agent.
#[derive(Debug, Clone)]
pub struct AgentApi {
    agent: Arc<Agent>,
}

impl AgentApi {
    pub fn new(agent: Arc<Agent>) -> Self {
        Self { agent }
    }
}

fn to_status(e: AgentError) -> Status {
    match e {
        AgentError::InvalidPod(m) => Status::invalid_argument(m),
        AgentError::Datapath(super::datapath::DatapathError::Unavailable(m)) => {
            Status::unavailable(m)
        }
        AgentError::Datapath(super::datapath::DatapathError::NoSuchInterface(m)) => {
            Status::invalid_argument(format!("no interface named {m} on this node"))
        }
        other => Status::internal(other.to_string()),
    }
}

/// Turn an AddPod request into a registry record, or say what is wrong with it.
pub fn pod_from_request(r: AddPodRequest) -> Result<PodRecord, Status> {
    let bad = |m: String| Err(Status::invalid_argument(m));
    if r.container_id.is_empty() {
        return bad("container_id is empty".into());
    }
    if r.host_ifname.is_empty() || r.host_ifindex == 0 {
        return bad("host_ifname and host_ifindex are required".into());
    }
    let Ok(ip) = r.ip.parse() else {
        return bad(format!("ip {:?} is not an IPv4 address", r.ip));
    };
    let pod_mac = Mac::try_from(&r.pod_mac[..])
        .map_err(|_| Status::invalid_argument("pod_mac must be 6 bytes"))?;
    let host_mac = Mac::try_from(&r.host_mac[..])
        .map_err(|_| Status::invalid_argument("host_mac must be 6 bytes"))?;
    let mut ports = Vec::new();
    for p in r.ports {
        let Ok(port) = u16::try_from(p.port) else {
            return bad(format!("container port {} is out of range", p.port));
        };
        ports.push(PodPort {
            name: p.name,
            port,
            protocol: p.protocol,
        });
    }
    Ok(PodRecord {
        container_id: r.container_id,
        ifname: if r.ifname.is_empty() {
            "eth0".into()
        } else {
            r.ifname
        },
        netns: r.netns,
        host_ifname: r.host_ifname,
        host_ifindex: r.host_ifindex,
        ip,
        pod_mac,
        host_mac,
        namespace: r.namespace,
        name: r.name,
        labels: r.labels.into_iter().collect::<BTreeMap<_, _>>(),
        ports,
    })
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn node_info(
        &self,
        _: Request<NodeInfoRequest>,
    ) -> Result<Response<NodeInfoResponse>, Status> {
        let c = &self.agent.config;
        Ok(Response::new(NodeInfoResponse {
            node_name: c.node_name.clone(),
            pod_cidr: c.pod_cidr.to_string(),
            cluster_cidr: c.cluster_cidr.to_string(),
            service_cidr: c.service_cidr.to_string(),
            underlay_mtu: c.underlay.mtu,
            pod_mtu: c.pod_mtu,
        }))
    }

    async fn add_pod(
        &self,
        request: Request<AddPodRequest>,
    ) -> Result<Response<AddPodResponse>, Status> {
        let pod = pod_from_request(request.into_inner())?;
        tracing::info!(container = %pod.container_id, ip = %pod.ip, veth = %pod.host_ifname, "add pod");
        self.agent.add_pod(pod).await.map_err(to_status)?;
        Ok(Response::new(AddPodResponse {}))
    }

    async fn del_pod(
        &self,
        request: Request<DelPodRequest>,
    ) -> Result<Response<DelPodResponse>, Status> {
        let r = request.into_inner();
        let ifname = if r.ifname.is_empty() {
            "eth0".to_owned()
        } else {
            r.ifname
        };
        tracing::info!(container = %r.container_id, "del pod");
        let existed = self
            .agent
            .del_pod(&(r.container_id, ifname))
            .await
            .map_err(to_status)?;
        Ok(Response::new(DelPodResponse { existed }))
    }

    type ObserveStream = super::events::ObserveStream;

    async fn observe(
        &self,
        request: Request<ObserveRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        Ok(Response::new(super::events::observe(
            &self.agent,
            request.into_inner(),
        )))
    }

    async fn trace(
        &self,
        request: Request<TraceRequest>,
    ) -> Result<Response<TraceResponse>, Status> {
        let trace = self.agent.trace(request.into_inner()).await?;
        Ok(Response::new(TraceResponse { trace: Some(trace) }))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(match self.agent.status() {
            Ok(()) => StatusResponse {
                ready: true,
                message: self.agent.control_note().unwrap_or_default(),
            },
            Err(message) => StatusResponse {
                ready: false,
                message: match self.agent.control_note() {
                    Some(note) => format!("{message}; {note}"),
                    None => message,
                },
            },
        }))
    }
}

/// Bind the unix socket at `path` (mode 0600, replacing a stale socket).
pub fn bind(path: &Path) -> Result<UnixListener, AgentError> {
    let io = |what, source| AgentError::Io {
        what,
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io("create socket dir", e))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("remove stale socket", e)),
    }
    let listener = UnixListener::bind(path).map_err(|e| io("bind", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| io("chmod", e))?;
    Ok(listener)
}

/// Serve the API on `listener` until `shutdown` completes, then remove the socket file.
pub async fn serve(
    agent: Arc<Agent>,
    listener: UnixListener,
    socket: PathBuf,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let r = tonic::transport::Server::builder()
        .add_service(AgentServer::new(AgentApi::new(agent)))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;
    let _ = std::fs::remove_file(&socket);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> AddPodRequest {
        AddPodRequest {
            container_id: "c1".into(),
            netns: "/var/run/netns/p".into(),
            ifname: "eth0".into(),
            host_ifname: "vethc1".into(),
            host_ifindex: 12,
            ip: "10.244.1.5".into(),
            pod_mac: vec![2, 0, 0, 0, 0, 1],
            host_mac: vec![2, 0, 0, 0, 0, 2],
            ..Default::default()
        }
    }

    #[test]
    fn valid_request_becomes_a_record() {
        let p = pod_from_request(req()).unwrap();
        assert_eq!(p.ip, std::net::Ipv4Addr::new(10, 244, 1, 5));
        assert_eq!(p.host_mac, Mac([2, 0, 0, 0, 0, 2]));
    }

    #[test]
    fn bad_requests_are_invalid_argument() {
        type Edit = Box<dyn Fn(&mut AddPodRequest)>;
        let cases: Vec<Edit> = vec![
            Box::new(|r| r.ip = "10.244.1".into()),
            Box::new(|r| r.pod_mac = vec![1, 2, 3]),
            Box::new(|r| r.host_mac = vec![]),
            Box::new(|r| r.container_id.clear()),
            Box::new(|r| r.host_ifindex = 0),
            Box::new(|r| {
                r.ports = vec![sluice_control::agent_api::ContainerPort {
                    name: "x".into(),
                    port: 70000,
                    protocol: "TCP".into(),
                }]
            }),
        ];
        for f in cases {
            let mut r = req();
            f(&mut r);
            assert_eq!(
                pod_from_request(r).unwrap_err().code(),
                tonic::Code::InvalidArgument
            );
        }
    }
}
