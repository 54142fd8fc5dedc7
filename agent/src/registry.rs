//! The pod registry: the pods wired on this node, keyed by (container id, interface).
//!
//! It is the agent's memory across restarts: every change is written to `<state>/pods.json`
//! (write to a temporary file, fsync, rename) before the RPC answers, so an agent killed with
//! SIGKILL finds its pods again and re-attaches them without the runtime recreating them.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::config::Mac;

/// A pod known to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    pub container_id: String,
    pub ifname: String,
    pub netns: String,
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub ip: Ipv4Addr,
    pub pod_mac: Mac,
    pub host_mac: Mac,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub ports: Vec<PodPort>,
}

impl PodRecord {
    /// The pod's namespace, `default` when the runtime gave none (as Kubernetes defaults it).
    pub fn namespace_or_default(&self) -> &str {
        if self.namespace.is_empty() {
            "default"
        } else {
            &self.namespace
        }
    }
}

/// A named container port (for NetworkPolicy named ports).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodPort {
    pub name: String,
    pub port: u16,
    pub protocol: String,
}

/// The registry key.
pub type PodKey = (String, String);

/// The persisted set of pods.
#[derive(Debug)]
pub struct PodRegistry {
    path: PathBuf,
    pods: BTreeMap<PodKey, PodRecord>,
}

/// The registry file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot access pod registry {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pod registry {} is corrupt: {source}", path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl PodRegistry {
    /// Open the registry at `path`, reading it if it exists.
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        let io = |source| RegistryError::Io {
            path: path.to_owned(),
            source,
        };
        let pods = match std::fs::read(path) {
            Ok(bytes) => {
                let list: Vec<PodRecord> =
                    serde_json::from_slice(&bytes).map_err(|source| RegistryError::Corrupt {
                        path: path.to_owned(),
                        source,
                    })?;
                list.into_iter()
                    .map(|p| ((p.container_id.clone(), p.ifname.clone()), p))
                    .collect()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(io(e)),
        };
        Ok(Self {
            path: path.to_owned(),
            pods,
        })
    }

    pub fn get(&self, key: &PodKey) -> Option<&PodRecord> {
        self.pods.get(key)
    }

    pub fn pods(&self) -> impl Iterator<Item = &PodRecord> {
        self.pods.values()
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// The pod holding `ip`, if any.
    pub fn by_ip(&self, ip: Ipv4Addr) -> Option<&PodRecord> {
        self.pods.values().find(|p| p.ip == ip)
    }

    /// Insert or replace a pod and persist.
    pub fn insert(&mut self, pod: PodRecord) -> Result<Option<PodRecord>, RegistryError> {
        let old = self
            .pods
            .insert((pod.container_id.clone(), pod.ifname.clone()), pod);
        self.save()?;
        Ok(old)
    }

    /// Remove a pod and persist.
    pub fn remove(&mut self, key: &PodKey) -> Result<Option<PodRecord>, RegistryError> {
        let old = self.pods.remove(key);
        if old.is_some() {
            self.save()?;
        }
        Ok(old)
    }

    /// Remove every pod `gone` holds true for and persist; returns them.
    pub fn remove_gone(
        &mut self,
        gone: impl Fn(&PodRecord) -> bool,
    ) -> Result<Vec<PodRecord>, RegistryError> {
        let keys: Vec<PodKey> = self
            .pods
            .iter()
            .filter(|(_, p)| gone(p))
            .map(|(k, _)| k.clone())
            .collect();
        let removed: Vec<PodRecord> = keys.iter().filter_map(|k| self.pods.remove(k)).collect();
        if !removed.is_empty() {
            self.save()?;
        }
        Ok(removed)
    }

    fn save(&self) -> Result<(), RegistryError> {
        let io = |source| RegistryError::Io {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let list: Vec<&PodRecord> = self.pods.values().collect();
        let bytes = serde_json::to_vec_pretty(&list).expect("pod records always serialize");
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)
    }
}

/// Whether `pod` may be wired on a node whose pod CIDR is `pod_cidr`, beside the `pods` already
/// there: its IP is a pod address of the CIDR (not the network address, which is the VTEP's) and
/// no other container or interface holds it. The reason, for the caller, when not. Pure: the
/// checks `Agent::add_pod` makes while the holder's veth still exists (it also lets a holder
/// whose veth is gone go, which needs the system), as the socket-request fuzz target drives them.
pub fn admit<'a>(
    pod_cidr: Ipv4Net,
    pods: impl IntoIterator<Item = &'a PodRecord>,
    pod: &PodRecord,
) -> Result<(), String> {
    if !pod_cidr.contains(&pod.ip) || pod.ip == pod_cidr.network() {
        return Err(format!(
            "ip {} is not a pod address of this node's pod CIDR {pod_cidr}",
            pod.ip
        ));
    }
    if let Some(other) = pods.into_iter().find(|p| p.ip == pod.ip)
        && (other.container_id != pod.container_id || other.ifname != pod.ifname)
    {
        return Err(format!(
            "ip {} already belongs to container {}",
            pod.ip, other.container_id
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(id: &str, ip: [u8; 4]) -> PodRecord {
        PodRecord {
            container_id: id.into(),
            ifname: "eth0".into(),
            netns: "/var/run/netns/x".into(),
            host_ifname: format!("veth{id}"),
            host_ifindex: 7,
            ip: ip.into(),
            pod_mac: Mac([2, 0, 0, 0, 0, 1]),
            host_mac: Mac([2, 0, 0, 0, 0, 2]),
            namespace: "default".into(),
            name: id.into(),
            labels: [("app".to_string(), "web".to_string())].into(),
            ports: vec![],
        }
    }

    #[test]
    fn admit_checks_the_cidr_and_who_holds_the_ip() {
        let cidr: Ipv4Net = "10.244.1.0/24".parse().unwrap();
        let pods = [pod("a", [10, 244, 1, 2])];
        assert!(admit(cidr, &pods, &pod("b", [10, 244, 1, 3])).is_ok());
        // The same container and interface again (a repeated ADD) keeps its address.
        assert!(admit(cidr, &pods, &pod("a", [10, 244, 1, 2])).is_ok());
        let e = admit(cidr, &pods, &pod("b", [10, 244, 1, 2])).unwrap_err();
        assert!(e.contains("already belongs to container a"), "{e}");
        let e = admit(cidr, &pods, &pod("b", [10, 244, 2, 3])).unwrap_err();
        assert!(e.contains("not a pod address"), "{e}");
        // The network address is the VTEP's.
        assert!(admit(cidr, &pods, &pod("b", [10, 244, 1, 0])).is_err());
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/pods.json");
        let mut r = PodRegistry::open(&path).unwrap();
        assert!(r.is_empty());
        r.insert(pod("a", [10, 244, 1, 2])).unwrap();
        r.insert(pod("b", [10, 244, 1, 3])).unwrap();
        r.remove(&("a".into(), "eth0".into())).unwrap();
        let r2 = PodRegistry::open(&path).unwrap();
        assert_eq!(r2.len(), 1);
        assert_eq!(r2.by_ip(Ipv4Addr::new(10, 244, 1, 3)).unwrap().name, "b");
        assert!(r2.by_ip(Ipv4Addr::new(10, 244, 1, 2)).is_none());
    }

    #[test]
    fn remove_gone_persists_what_stays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pods.json");
        let mut r = PodRegistry::open(&path).unwrap();
        for (id, last) in [("a", 2), ("b", 3), ("c", 4)] {
            r.insert(pod(id, [10, 244, 1, last])).unwrap();
        }
        let gone = r.remove_gone(|p| p.container_id != "b").unwrap();
        let ids: Vec<&str> = gone.iter().map(|p| p.container_id.as_str()).collect();
        assert_eq!(ids, ["a", "c"]);
        assert!(r.remove_gone(|_| false).unwrap().is_empty());
        let r2 = PodRegistry::open(&path).unwrap();
        assert_eq!(r2.len(), 1);
        assert!(
            r2.by_ip(Ipv4Addr::new(10, 244, 1, 2)).is_none(),
            "its address is free"
        );
    }

    #[test]
    fn corrupt_file_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pods.json");
        std::fs::write(&path, b"{not json").unwrap();
        assert!(matches!(
            PodRegistry::open(&path),
            Err(RegistryError::Corrupt { .. })
        ));
    }
}
