//! Kubernetes manifests read from files in standalone mode (Services, EndpointSlices,
//! NetworkPolicies, Namespaces), parsed with serde-saphyr into k8s-openapi types. A file may hold
//! several YAML documents separated by `---`.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::de::DeserializeOwned;

use super::config::Manifests;

/// A manifest file could not be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("manifest {} is not a valid {kind} list: {message}", path.display())]
    Parse {
        path: PathBuf,
        kind: &'static str,
        message: String,
    },
}

/// All objects the manifests describe.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ClusterObjects {
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub network_policies: Vec<NetworkPolicy>,
    pub namespaces: Vec<Namespace>,
    /// Other nodes learned from the control plane (the config's `peers` win by name).
    pub peers: Vec<super::config::PeerNode>,
    /// Pods learned from the control plane: other nodes' pods for policy selectors, and the
    /// labels and ports of this node's pods (they replace the registry's, matched by IP).
    pub pods: Vec<sluice_dataplane::policy::PodInfo>,
}

impl ClusterObjects {
    /// Read every file the config names.
    pub fn load(m: &Manifests) -> Result<Self, ManifestError> {
        Ok(Self {
            services: load_all(&m.services, "Service")?,
            endpoint_slices: load_all(&m.endpoint_slices, "EndpointSlice")?,
            network_policies: load_all(&m.network_policies, "NetworkPolicy")?,
            namespaces: load_all(&m.namespaces, "Namespace")?,
            ..Default::default()
        })
    }
}

fn load_all<T: DeserializeOwned>(
    paths: &[PathBuf],
    kind: &'static str,
) -> Result<Vec<T>, ManifestError> {
    let mut out = Vec::new();
    for p in paths {
        out.extend(load_file(p, kind)?);
    }
    Ok(out)
}

fn load_file<T: DeserializeOwned>(
    path: &Path,
    kind: &'static str,
) -> Result<Vec<T>, ManifestError> {
    let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_documents(&text).map_err(|message| ManifestError::Parse {
        path: path.to_owned(),
        kind,
        message,
    })
}

/// Parse one or more YAML documents of one kind.
pub fn parse_documents<T: DeserializeOwned>(text: &str) -> Result<Vec<T>, String> {
    serde_saphyr::from_multiple::<T>(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_and_slices_parse() {
        let svc = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports:
    - {name: http, port: 80, targetPort: 8080, protocol: TCP, nodePort: 30080}
---
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: kube-system}
spec:
  clusterIP: 10.96.0.53
  ports: [{name: dns, port: 53, protocol: UDP}]
"#;
        let s: Vec<Service> = parse_documents(svc).unwrap();
        assert_eq!(s.len(), 2);
        let spec = s[0].spec.as_ref().unwrap();
        assert_eq!(spec.ports.as_ref().unwrap()[0].node_port, Some(30080));

        let eps = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
  - addresses: [10.244.1.2]
  - addresses: [10.244.2.2]
    conditions: {ready: false}
"#;
        let e: Vec<EndpointSlice> = parse_documents(eps).unwrap();
        assert_eq!(e[0].endpoints.as_ref().map(Vec::len), Some(2));
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(parse_documents::<Service>("spec: [1, 2").is_err());
    }
}
