//! The verbs: ADD, DEL, CHECK, VERSION, GC, STATUS.
//!
//! `run` takes the command, stdin and a way to read environment variables, and returns the JSON
//! to print or the CNI error. ADD follows reserve -> wire -> register -> commit under the IPAM
//! lock (see `ipam`), and undoes its own steps on any failure.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde_json::{Value, json};
use sluice_control::agent_api::{AddPodRequest, ContainerPort, NodeInfoResponse};

use crate::agent::Agent;
use crate::config::{self, MtuMode, NetConf, POD_GATEWAY, SUPPORTED_VERSIONS};
use crate::env::{CniEnv, Command};
use crate::error::{CniError, Code, again, env};
use crate::ipam::{self, Record, State, Store};
use crate::netns::{NetnsSockets, PodNetns, host_sockets};
use crate::result::{CniResult, Interface, IpConfig, Route, mac_string};
use crate::wire::{self, Plan, PodRoute};
use crate::{DEFAULT_POD_MTU, DEFAULT_UNDERLAY_MTU, VXLAN_OVERHEAD, crash_point};

/// The `cniVersion` to answer in: the caller's, when stdin carries a string one.
pub fn caller_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| "1.1.0".to_string())
}

/// Run one plugin invocation. `command` is `CNI_COMMAND`.
pub async fn run(
    command: Option<&str>,
    stdin: &[u8],
    var: impl Fn(&str) -> Option<String>,
) -> Result<Option<Value>, CniError> {
    let Some(command) = command.filter(|c| !c.is_empty()) else {
        return Err(env(
            "CNI_COMMAND is not set; it must be one of ADD, DEL, CHECK, VERSION, GC, STATUS",
        ));
    };
    let cmd = Command::parse(command)?;
    if cmd == Command::Version {
        return Ok(Some(version(stdin)));
    }
    let conf = config::parse(stdin)?;
    for note in &conf.notes {
        eprintln!("sluice-cni: {note}");
    }
    match cmd {
        Command::Add => add(&conf, stdin, &CniEnv::read(cmd, var)?).await.map(Some),
        Command::Del => del(&conf, stdin, &CniEnv::read(cmd, var)?)
            .await
            .map(|_| None),
        Command::Check => check(&conf, stdin, &CniEnv::read(cmd, var)?)
            .await
            .map(|_| None),
        Command::Gc => gc(&conf, stdin, &var).await.map(|_| None),
        Command::Status => status(&conf).await.map(|_| None),
        Command::Version => Ok(Some(version(stdin))),
    }
}

fn version(stdin: &[u8]) -> Value {
    json!({ "cniVersion": caller_version(stdin), "supportedVersions": SUPPORTED_VERSIONS })
}

fn need_v11(conf: &NetConf, verb: &str) -> Result<(), CniError> {
    if conf.cni_version == "1.1.0" {
        Ok(())
    } else {
        Err(CniError::new(
            Code::IncompatibleVersion,
            format!(
                "{verb} exists from cniVersion 1.1.0 on; this configuration says {}",
                conf.cni_version
            ),
        ))
    }
}

/// The largest MTU the kernel keeps on a route (larger values are clamped to it).
pub const MAX_ROUTE_MTU: u32 = 65520;

/// The node's networking facts, from the configuration first, then the agent, then defaults.
#[derive(Debug, Clone)]
pub struct NodeNet {
    pub pod_cidr: Option<Ipv4Net>,
    pub cluster_cidr: Option<Ipv4Net>,
    pub mtu: u32,
    pub routes: Vec<PodRoute>,
}

impl NodeNet {
    pub fn resolve(conf: &NetConf, info: Option<&NodeInfoResponse>) -> Result<Self, CniError> {
        let parse = |what: &str, s: &str| -> Result<Option<Ipv4Net>, CniError> {
            if s.is_empty() {
                return Ok(None);
            }
            s.parse::<Ipv4Net>().map(|n| Some(n.trunc())).map_err(|_| {
                again(format!(
                    "the sluice agent reports {what} {s:?}, which is not an IPv4 CIDR"
                ))
            })
        };
        let pod_cidr = match conf.ipam.subnet {
            Some(s) => Some(s.trunc()),
            None => match info {
                Some(i) => parse("pod CIDR", &i.pod_cidr)?,
                None => None,
            },
        };
        if pod_cidr.is_none() && conf.ipam.delegate().is_none() {
            return Err(again(
                "this node has no pod CIDR yet (the sluice agent reports none and ipam.subnet is not set); retry once the node has one",
            ));
        }
        let cluster_cidr = match conf.cluster_cidr {
            Some(c) => Some(c.trunc()),
            None => match info {
                Some(i) => parse("cluster CIDR", &i.cluster_cidr)?,
                None => None,
            },
        };
        let service_cidr = match conf.service_cidr {
            Some(c) => Some(c.trunc()),
            None => match info {
                Some(i) => parse("service CIDR", &i.service_cidr)?,
                None => None,
            },
        };
        let nonzero = |v: u32| (v != 0).then_some(v);
        let settings = &conf.sluice_mtu;
        let underlay = settings
            .underlay_mtu
            .or(info.and_then(|i| nonzero(i.underlay_mtu)))
            .unwrap_or(DEFAULT_UNDERLAY_MTU);
        // An integer `mtu` is the interface MTU in either mode (config::validate rejects it
        // disagreeing with the mode's own key).
        let pod_mtu = conf
            .mtu
            .or(settings.pod_mtu)
            .or(info.and_then(|i| nonzero(i.pod_mtu)))
            .unwrap_or(DEFAULT_POD_MTU);
        let remote_mtu = underlay.saturating_sub(VXLAN_OVERHEAD);
        let default: Ipv4Net = Ipv4Net::default();
        Ok(match settings.mode {
            MtuMode::Plain => NodeNet {
                pod_cidr,
                cluster_cidr,
                mtu: conf.mtu.or(settings.plain_mtu).unwrap_or(remote_mtu),
                routes: vec![PodRoute {
                    dst: default,
                    mtu: None,
                }],
            },
            MtuMode::Routes => {
                // Inside the cluster (every node's pods, the Services) a pod never sees a small
                // MTU: the node's dataplane segments for the underlay (DESIGN, MTU strategy).
                // Only the way out of the cluster keeps the underlay's. No route MTU exceeds the
                // interface's (the veth would drop what the route let through).
                let large = Some(pod_mtu.min(MAX_ROUTE_MTU));
                let mut routes = Vec::new();
                for cidr in [pod_cidr, cluster_cidr, service_cidr].into_iter().flatten() {
                    if !routes.iter().any(|r: &PodRoute| r.dst.contains(&cidr)) {
                        routes.push(PodRoute {
                            dst: cidr,
                            mtu: large,
                        });
                    }
                }
                routes.push(PodRoute {
                    dst: default,
                    mtu: Some(remote_mtu.min(pod_mtu)),
                });
                NodeNet {
                    pod_cidr,
                    cluster_cidr,
                    mtu: pod_mtu,
                    routes,
                }
            }
        })
    }
}

fn plan_from_result(record: &Record, result: &CniResult) -> Option<Plan> {
    let pod = result
        .interfaces
        .iter()
        .find(|i| i.name == record.ifname && i.sandbox.is_some())?;
    Some(Plan {
        host_ifname: record.host_ifname.clone(),
        ifname: record.ifname.clone(),
        ip: record.ip?,
        mtu: pod.mtu?,
        routes: result
            .routes
            .iter()
            .filter(|r| r.gw == Some(POD_GATEWAY))
            .map(|r| PodRoute {
                dst: r.dst,
                mtu: r.mtu,
            })
            .collect(),
    })
}

async fn connect_agent(conf: &NetConf) -> Result<Option<Agent>, CniError> {
    if !conf.agent {
        return Ok(None);
    }
    Agent::connect(&conf.agent_socket(), conf.agent_timeout())
        .await
        .map(Some)
}

/// Undo an attachment: its host veth (and with it the pod end, routes, neighbors), its agent
/// registration (best effort), its delegated address (when it is the current container's), and
/// its record. The record stays if the veth cannot be removed, so its address is not reused
/// while a route to it exists.
async fn undo(
    store: &Store,
    key: &str,
    record: &Record,
    host: &NetnsSockets,
    agent: Option<&mut Agent>,
    delegate_ctx: Option<(&CniEnv, &[u8])>,
) -> Result<(), CniError> {
    wire::delete_link(&host.handle, &record.host_ifname).await?;
    if let Some(agent) = agent
        && let Err(e) = agent.del_pod(&record.container_id, &record.ifname).await
    {
        eprintln!(
            "sluice-cni: deregistering {}/{}: {e}",
            record.container_id, record.ifname
        );
    }
    if let Some(plugin) = &record.delegate {
        match delegate_ctx {
            Some((env, stdin))
                if env.container_id == record.container_id && env.ifname == record.ifname =>
            {
                crate::delegate::exec(plugin, &env.path, Command::Del, stdin)?;
            }
            _ => eprintln!(
                "sluice-cni: address of {}/{} from IPAM plugin {plugin} is released by the runtime's DEL or GC",
                record.container_id, record.ifname
            ),
        }
    }
    store.remove(key)
}

/// Roll back every ADD that died or failed while holding the lock (records still `Reserved`).
async fn reclaim_reserved(
    store: &Store,
    host: &NetnsSockets,
    mut agent: Option<&mut Agent>,
    delegate_ctx: Option<(&CniEnv, &[u8])>,
) -> Result<(), CniError> {
    for (key, record) in store.records()? {
        if record.state == State::Reserved {
            undo(
                store,
                &key,
                &record,
                host,
                agent.as_deref_mut(),
                delegate_ctx,
            )
            .await?;
        }
    }
    Ok(())
}

async fn add(conf: &NetConf, stdin: &[u8], env: &CniEnv) -> Result<Value, CniError> {
    let netns = PodNetns::open(&env.netns)?;
    let host = host_sockets()?;
    let pod = netns.sockets()?;
    let mut agent = connect_agent(conf).await?;
    let info = match agent.as_mut() {
        Some(a) => Some(a.node_info().await?),
        None => None,
    };
    let node = NodeNet::resolve(conf, info.as_ref())?;
    let store = Store::open(&conf.ipam_dir())?;
    let ctx = Some((env, stdin));
    reclaim_reserved(&store, &host, agent.as_mut(), ctx).await?;

    // Repeated ADD: answer the same while the wiring is in place; otherwise start over.
    if let Some((key, record)) = store.find(&env.container_id, &env.ifname)? {
        let intact = wire::find_link(&host.handle, &record.host_ifname)
            .await?
            .is_some()
            && wire::find_link(&pod.handle, &record.ifname)
                .await?
                .is_some()
            && record.netns == env.netns;
        match (&record.result, intact) {
            (Some(result), true) => return Ok(result.to_json(&conf.cni_version)),
            _ => undo(&store, &key, &record, &host, agent.as_mut(), ctx).await?,
        }
    }

    let host_ifname = ipam::host_ifname(&env.container_id, &env.ifname);
    let mut record = Record {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        netns: env.netns.clone(),
        host_ifname: host_ifname.clone(),
        state: State::Reserved,
        ip: None,
        delegate: conf.ipam.delegate().map(str::to_string),
        result: None,
    };
    // Reserve.
    let mut dns = Default::default();
    let key = match conf.ipam.delegate() {
        None => {
            let subnet = node
                .pod_cidr
                .ok_or_else(|| again("no pod CIDR to allocate from"))?;
            store.reserve_ip(subnet, &mut record)?.0
        }
        Some(plugin) => {
            let key = ipam::delegated_key(&env.container_id, &env.ifname);
            store.create(&key, &record)?;
            let got = match crate::delegate::add(plugin, &env.path, stdin) {
                Ok(got) => got,
                Err(e) => {
                    store.remove(&key)?;
                    return Err(e);
                }
            };
            let Some(ip) = got.ips.first().map(|i| i.address.addr()) else {
                let _ = crate::delegate::exec(plugin, &env.path, Command::Del, stdin);
                store.remove(&key)?;
                return Err(CniError::new(
                    Code::Io,
                    format!("IPAM plugin {plugin} returned no IPv4 address"),
                ));
            };
            dns = got.dns;
            record.ip = Some(ip);
            store.put(&key, &record)?;
            key
        }
    };
    crash_point("reserved");

    let sides = Sides {
        netns: &netns,
        host: &host,
        pod: &pod,
    };
    let outcome = wire_and_register(conf, env, sides, agent.as_mut(), &node, &record).await;
    let result = match outcome {
        Ok(mut result) => {
            result.dns = dns;
            if let Some(prev) = &conf.prev_result {
                let mut all = CniResult::from_json(prev)?;
                all.append(result);
                result = all;
            }
            result
        }
        Err(e) => {
            if let Err(u) = undo(&store, &key, &record, &host, agent.as_mut(), ctx).await {
                eprintln!("sluice-cni: rollback after failed ADD: {u}");
            }
            return Err(e);
        }
    };
    crash_point("registered");
    record.state = State::Committed;
    record.result = Some(result.clone());
    store.put(&key, &record)?;
    crash_point("committed");
    Ok(result.to_json(&conf.cni_version))
}

/// The two ends of the veth being wired: the pod's netns and the netlink sockets on each side.
#[derive(Clone, Copy)]
struct Sides<'a> {
    netns: &'a PodNetns,
    host: &'a NetnsSockets,
    pod: &'a NetnsSockets,
}

async fn wire_and_register(
    conf: &NetConf,
    env: &CniEnv,
    sides: Sides<'_>,
    agent: Option<&mut Agent>,
    node: &NodeNet,
    record: &Record,
) -> Result<CniResult, CniError> {
    let ip: Ipv4Addr = record.ip.ok_or_else(|| again("no address reserved"))?;
    // A leftover host veth of this very attachment (e.g. an IPAM directory that was wiped).
    let Sides { netns, host, pod } = sides;
    wire::delete_link(&host.handle, &record.host_ifname).await?;
    let plan = Plan {
        host_ifname: record.host_ifname.clone(),
        ifname: env.ifname.clone(),
        ip,
        mtu: node.mtu,
        routes: node.routes.clone(),
    };
    let wired = wire::wire(host, pod, netns, &plan).await?;
    crash_point("wired");
    if let Some(agent) = agent {
        let ports = conf
            .runtime_config
            .port_mappings
            .iter()
            .map(|p| ContainerPort {
                name: String::new(),
                port: u32::from(p.container_port),
                protocol: p.protocol.as_deref().unwrap_or("tcp").to_ascii_uppercase(),
            })
            .collect();
        agent
            .add_pod(AddPodRequest {
                container_id: env.container_id.clone(),
                netns: env.netns.clone(),
                ifname: env.ifname.clone(),
                host_ifname: record.host_ifname.clone(),
                host_ifindex: wired.host_index,
                ip: ip.to_string(),
                pod_mac: wired.pod_mac.clone(),
                host_mac: wired.host_mac.clone(),
                namespace: env.k8s_namespace().to_string(),
                name: env.k8s_name().to_string(),
                labels: conf.runtime_config.labels.clone().into_iter().collect(),
                ports,
            })
            .await?;
    }
    Ok(CniResult {
        interfaces: vec![
            Interface {
                name: record.host_ifname.clone(),
                mac: mac_string(&wired.host_mac),
                sandbox: None,
                mtu: Some(plan.mtu),
            },
            Interface {
                name: env.ifname.clone(),
                mac: mac_string(&wired.pod_mac),
                sandbox: Some(env.netns.clone()),
                mtu: Some(plan.mtu),
            },
        ],
        ips: vec![IpConfig {
            address: Ipv4Net::new(ip, 32).map_err(|e| again(e.to_string()))?,
            gateway: Some(POD_GATEWAY),
            interface: Some(1),
        }],
        routes: plan
            .routes
            .iter()
            .map(|r| Route {
                dst: r.dst,
                gw: Some(POD_GATEWAY),
                mtu: r.mtu,
            })
            .collect(),
        dns: Default::default(),
    })
}

async fn del(conf: &NetConf, stdin: &[u8], env: &CniEnv) -> Result<(), CniError> {
    let host = host_sockets()?;
    // DEL must succeed without the agent: its registration is withdrawn when it is reachable,
    // and the agent reconciles against the node's veths when it starts.
    let mut agent = match connect_agent(conf).await {
        Ok(a) => a,
        Err(e) => {
            eprintln!("sluice-cni: DEL continues without the agent: {e}");
            None
        }
    };
    let store = Store::open(&conf.ipam_dir())?;
    let ctx = Some((env, stdin));
    match store.find(&env.container_id, &env.ifname)? {
        Some((key, record)) => undo(&store, &key, &record, &host, agent.as_mut(), ctx).await?,
        None => {
            wire::delete_link(
                &host.handle,
                &ipam::host_ifname(&env.container_id, &env.ifname),
            )
            .await?;
            if let Some(a) = agent.as_mut() {
                let _ = a.del_pod(&env.container_id, &env.ifname).await;
            }
            if let Some(plugin) = conf.ipam.delegate() {
                crate::delegate::exec(plugin, &env.path, Command::Del, stdin)?;
            }
        }
    }
    reclaim_reserved(&store, &host, agent.as_mut(), None).await
}

async fn check(conf: &NetConf, stdin: &[u8], env: &CniEnv) -> Result<(), CniError> {
    let netns = PodNetns::open(&env.netns)?;
    let host = host_sockets()?;
    let pod = netns.sockets()?;
    let store = Store::open(&conf.ipam_dir())?;
    let Some((_, record)) = store.find(&env.container_id, &env.ifname)? else {
        return Err(CniError::new(
            Code::ContainerUnknown,
            format!(
                "sluice-cni has no attachment for container {} interface {}; was ADD run?",
                env.container_id, env.ifname
            ),
        ));
    };
    let plan = match (&record.state, &record.result) {
        (State::Committed, Some(result)) => plan_from_result(&record, result),
        _ => None,
    }
    .ok_or_else(|| {
        CniError::new(
            Code::Drift,
            "the attachment's ADD did not finish; run DEL and ADD again",
        )
    })?;
    let mut drift = wire::check(&host, &pod, &plan).await?;
    if let Some(prev) = &conf.prev_result {
        let prev = CniResult::from_json(prev)?;
        if !prev.ips.iter().any(|i| i.address.addr() == plan.ip) {
            drift.push(format!(
                "prevResult does not list the pod address {}",
                plan.ip
            ));
        }
    }
    if let Some(plugin) = conf.ipam.delegate()
        && let Err(e) = crate::delegate::exec(plugin, &env.path, Command::Check, stdin)
    {
        drift.push(e.msg);
    }
    if record.netns != env.netns {
        drift.push(format!(
            "the attachment was made in {} but CNI_NETNS is {}",
            record.netns, env.netns
        ));
    }
    if drift.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            Code::Drift,
            format!(
                "attachment {}/{} drifted: {}",
                env.container_id,
                env.ifname,
                drift.join("; ")
            ),
        ))
    }
}

async fn gc(
    conf: &NetConf,
    stdin: &[u8],
    var: &impl Fn(&str) -> Option<String>,
) -> Result<(), CniError> {
    need_v11(conf, "GC")?;
    let valid = conf.valid_attachments.as_ref().ok_or_else(|| {
        crate::error::config("GC needs \"cni.dev/valid-attachments\" in the configuration")
    })?;
    let host = host_sockets()?;
    let mut agent = connect_agent(conf).await.unwrap_or_else(|e| {
        eprintln!("sluice-cni: GC continues without the agent: {e}");
        None
    });
    let store = Store::open(&conf.ipam_dir())?;
    for (key, record) in store.records()? {
        let kept = valid
            .iter()
            .any(|v| v.container_id == record.container_id && v.ifname == record.ifname);
        if !kept {
            undo(&store, &key, &record, &host, agent.as_mut(), None).await?;
        }
    }
    if let Some(plugin) = conf.ipam.delegate() {
        let path: Vec<String> = var("CNI_PATH")
            .unwrap_or_default()
            .split(':')
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect();
        if let Err(e) = crate::delegate::exec(plugin, &path, Command::Gc, stdin) {
            eprintln!("sluice-cni: GC of IPAM plugin {plugin}: {e}");
        }
    }
    Ok(())
}

async fn status(conf: &NetConf) -> Result<(), CniError> {
    need_v11(conf, "STATUS")?;
    if conf.agent {
        let socket = conf.agent_socket();
        let mut agent = Agent::connect(&socket, conf.agent_timeout())
            .await
            .map_err(|e| CniError::new(Code::NotAvailable, e.msg))?;
        let s = agent
            .status()
            .await
            .map_err(|e| CniError::new(Code::NotAvailable, e.msg))?;
        if !s.ready {
            return Err(CniError::new(
                Code::NotAvailable,
                format!(
                    "the sluice agent at {} is not ready: {}",
                    socket.display(),
                    s.message
                ),
            ));
        }
    }
    if conf.ipam.delegate().is_none() {
        Store::open(&conf.ipam_dir()).map_err(|e| CniError::new(Code::NotAvailable, e.msg))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_net_routes_mode() {
        let conf = config::parse(br#"{"cniVersion":"1.0.0","name":"n","type":"t","agent":false,"ipam":{"subnet":"10.244.1.0/24"},"clusterCidr":"10.244.0.0/16","serviceCidr":"10.96.0.0/12"}"#).unwrap();
        let n = NodeNet::resolve(&conf, None).unwrap();
        assert_eq!(n.mtu, 65535);
        let routes: Vec<_> = n
            .routes
            .iter()
            .map(|r| (r.dst.to_string(), r.mtu))
            .collect();
        assert_eq!(
            routes,
            [
                ("10.244.1.0/24".to_owned(), Some(65520)),
                ("10.244.0.0/16".to_owned(), Some(65520)),
                ("10.96.0.0/12".to_owned(), Some(65520)),
                ("0.0.0.0/0".to_owned(), Some(1450)),
            ],
            "the cluster and its Services at the large MTU, the way out at the underlay's"
        );
    }

    #[test]
    fn node_net_from_agent_and_plain() {
        let conf = config::parse(
            br#"{"cniVersion":"1.0.0","name":"n","type":"t","sluiceMtu":{"mode":"plain"}}"#,
        )
        .unwrap();
        let info = NodeInfoResponse {
            pod_cidr: "10.244.7.0/24".into(),
            underlay_mtu: 9000,
            ..Default::default()
        };
        let n = NodeNet::resolve(&conf, Some(&info)).unwrap();
        assert_eq!(n.mtu, 8950);
        assert_eq!(n.routes.len(), 1);
        assert_eq!(n.pod_cidr.unwrap().to_string(), "10.244.7.0/24");
        let empty = NodeInfoResponse::default();
        assert_eq!(
            NodeNet::resolve(&conf, Some(&empty)).unwrap_err().code,
            Code::TryAgainLater
        );
    }

    #[test]
    fn integer_mtu_is_the_interface_mtu() {
        let base = r#""cniVersion":"1.0.0","name":"n","type":"t","agent":false,"ipam":{"subnet":"10.244.1.0/24"},"clusterCidr":"10.244.0.0/16""#;
        let resolve = |extra: &str| {
            let conf = config::parse(format!("{{{base},{extra}}}").as_bytes()).unwrap();
            let n = NodeNet::resolve(&conf, None).unwrap();
            let routes: Vec<_> = n.routes.iter().map(|r| r.mtu).collect();
            (n.mtu, routes)
        };
        // Routes mode (the default): the interface at the integer, no route above it.
        assert_eq!(
            resolve(r#""mtu":1450"#),
            (1450, vec![Some(1450), Some(1450), Some(1450)])
        );
        assert_eq!(
            resolve(r#""mtu":9000,"sluiceMtu":{"underlayMtu":9000}"#),
            (9000, vec![Some(9000), Some(9000), Some(8950)])
        );
        assert_eq!(
            resolve(r#""mtu":1400"#),
            (1400, vec![Some(1400), Some(1400), Some(1400)]),
            "the way out capped at the interface MTU, not 1450"
        );
        // Plain mode: the integer is the interface MTU, no route MTUs.
        assert_eq!(
            resolve(r#""mtu":1400,"sluiceMtu":{"mode":"plain"}"#),
            (1400, vec![None])
        );
        // The agent's pod MTU is overridden by the configuration's.
        let conf =
            config::parse(br#"{"cniVersion":"1.0.0","name":"n","type":"t","mtu":1450}"#).unwrap();
        let info = NodeInfoResponse {
            pod_cidr: "10.244.7.0/24".into(),
            pod_mtu: 65535,
            underlay_mtu: 1500,
            ..Default::default()
        };
        assert_eq!(NodeNet::resolve(&conf, Some(&info)).unwrap().mtu, 1450);
        // The deprecated object form still means what it did.
        let old = config::parse(
            br#"{"cniVersion":"1.0.0","name":"n","type":"t","mtu":{"mode":"plain"}}"#,
        )
        .unwrap();
        assert_eq!(old.sluice_mtu.mode, MtuMode::Plain);
        assert_eq!(NodeNet::resolve(&old, Some(&info)).unwrap().mtu, 1450);
    }

    #[test]
    fn caller_version_falls_back() {
        assert_eq!(caller_version(br#"{"cniVersion":"0.4.0"}"#), "0.4.0");
        assert_eq!(caller_version(br#"{"cniVersion":"9"}"#), "1.1.0");
        assert_eq!(caller_version(b""), "1.1.0");
    }
}
