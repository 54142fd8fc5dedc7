//! The manifests the end-to-end tests share: the `web` Service of `examples/web/` (one copy, read
//! here at build time) and its EndpointSlice for the backends a test starts.

use std::net::Ipv4Addr;

/// `examples/web/10-service.yaml`: Service `default/web`, ClusterIP [`WEB_VIP`], port 80 ->
/// 8080, NodePort [`WEB_NODE_PORT`].
pub const WEB_SERVICE: &str = include_str!("../../examples/web/10-service.yaml");

/// The ClusterIP [`WEB_SERVICE`] asks for.
pub const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// The NodePort [`WEB_SERVICE`] asks for.
pub const WEB_NODE_PORT: u16 = 30080;

/// The EndpointSlice `default/web-1` of [`WEB_SERVICE`]: `backends` on port 8080, each ready.
pub fn web_endpoints(backends: &[Ipv4Addr]) -> String {
    let mut eps = String::from(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
",
    );
    if backends.is_empty() {
        eps.truncate(eps.len() - 1);
        eps.push_str(" []\n");
    }
    for ip in backends {
        eps.push_str(&format!(
            "  - {{addresses: [\"{ip}\"], conditions: {{ready: true}}}}\n"
        ));
    }
    eps
}

/// [`WEB_SERVICE`] and [`web_endpoints`] as one multi-document manifest (for `sluicectl apply`).
pub fn web(backends: &[Ipv4Addr]) -> String {
    format!("{WEB_SERVICE}---\n{}", web_endpoints(backends))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;

    #[test]
    fn the_example_service_is_the_one_the_tests_dial() {
        let s: Service = serde_saphyr::from_str(WEB_SERVICE).unwrap();
        let spec = s.spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.10"));
        assert_eq!(WEB_VIP.to_string(), "10.96.0.10");
        let p = &spec.ports.unwrap()[0];
        assert_eq!((p.port, p.node_port), (80, Some(i32::from(WEB_NODE_PORT))));
    }

    #[test]
    fn endpoints_list_every_backend_and_parse() {
        let ips = [Ipv4Addr::new(10, 244, 1, 3), Ipv4Addr::new(10, 244, 2, 2)];
        let e: EndpointSlice = serde_saphyr::from_str(&web_endpoints(&ips)).unwrap();
        let got: Vec<String> = e
            .endpoints
            .iter()
            .flatten()
            .flat_map(|e| e.addresses.clone())
            .collect();
        assert_eq!(got, ["10.244.1.3", "10.244.2.2"]);
        let none: EndpointSlice = serde_saphyr::from_str(&web_endpoints(&[])).unwrap();
        assert!(none.endpoints.unwrap_or_default().is_empty());
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&web(&ips)).unwrap();
        assert_eq!(docs.len(), 2);
    }
}
