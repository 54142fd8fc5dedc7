//! The ADD result: interfaces, ips, routes, dns, written in the caller's `cniVersion`.
//!
//! The plugin keeps one internal form (stored with the allocation so a repeated ADD answers the
//! same) and renders it per version: 0.4.0 adds `"version": "4"` to each ip; 1.1.0 adds route and
//! interface MTUs.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::CniError;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub dns: Dns,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    pub sandbox: Option<String>,
    pub mtu: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    pub address: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: Ipv4Net,
    pub gw: Option<Ipv4Addr>,
    pub mtu: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default)]
    pub nameservers: Vec<String>,
    #[serde(default)]
    pub domain: Option<String>,
    #[serde(default)]
    pub search: Vec<String>,
    #[serde(default)]
    pub options: Vec<String>,
}

/// Format a MAC as the spec writes it (lowercase, colon separated).
pub fn mac_string(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl CniResult {
    /// The result as the spec's JSON for `version`.
    pub fn to_json(&self, version: &str) -> Value {
        let v11 = version == "1.1.0";
        let v04 = version == "0.4.0";
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut o = json!({ "name": i.name, "mac": i.mac });
                if let Some(s) = &i.sandbox {
                    o["sandbox"] = json!(s);
                }
                if let (true, Some(m)) = (v11, i.mtu) {
                    o["mtu"] = json!(m);
                }
                o
            })
            .collect();
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut o = json!({ "address": ip.address.to_string() });
                if v04 {
                    o["version"] = json!("4");
                }
                if let Some(gw) = ip.gateway {
                    o["gateway"] = json!(gw.to_string());
                }
                if let Some(i) = ip.interface {
                    o["interface"] = json!(i);
                }
                o
            })
            .collect();
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|r| {
                let mut o = json!({ "dst": r.dst.to_string() });
                if let Some(gw) = r.gw {
                    o["gw"] = json!(gw.to_string());
                }
                if let (true, Some(m)) = (v11, r.mtu) {
                    o["mtu"] = json!(m);
                }
                o
            })
            .collect();
        let mut dns = json!({});
        if !self.dns.nameservers.is_empty() {
            dns["nameservers"] = json!(self.dns.nameservers);
        }
        if let Some(d) = &self.dns.domain {
            dns["domain"] = json!(d);
        }
        if !self.dns.search.is_empty() {
            dns["search"] = json!(self.dns.search);
        }
        if !self.dns.options.is_empty() {
            dns["options"] = json!(self.dns.options);
        }
        json!({
            "cniVersion": version,
            "interfaces": interfaces,
            "ips": ips,
            "routes": routes,
            "dns": dns,
        })
    }

    /// Read a result in any supported version (a prevResult, or a delegated IPAM plugin's
    /// answer). IPv6 entries are skipped: Sluice is IPv4 only for now.
    pub fn from_json(v: &Value) -> Result<Self, CniError> {
        let bad = |what: &str| {
            CniError::new(
                crate::error::Code::Decode,
                format!("cannot read CNI result: {what}"),
            )
        };
        let obj = v.as_object().ok_or_else(|| bad("not an object"))?;
        let mut out = CniResult::default();
        if let Some(ifs) = obj.get("interfaces").and_then(Value::as_array) {
            for i in ifs {
                out.interfaces.push(Interface {
                    name: i
                        .get("name")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    mac: i
                        .get("mac")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    sandbox: i.get("sandbox").and_then(Value::as_str).map(str::to_string),
                    mtu: i
                        .get("mtu")
                        .and_then(Value::as_u64)
                        .and_then(|m| u32::try_from(m).ok()),
                });
            }
        }
        if let Some(ips) = obj.get("ips").and_then(Value::as_array) {
            for ip in ips {
                let addr = ip
                    .get("address")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("ip without address"))?;
                let Ok(address) = addr.parse::<Ipv4Net>() else {
                    if addr.contains(':') {
                        continue;
                    }
                    return Err(bad(&format!("address {addr:?} is not IPv4 CIDR")));
                };
                out.ips.push(IpConfig {
                    address,
                    gateway: ip
                        .get("gateway")
                        .and_then(Value::as_str)
                        .and_then(|g| g.parse().ok()),
                    interface: ip
                        .get("interface")
                        .and_then(Value::as_u64)
                        .and_then(|i| usize::try_from(i).ok()),
                });
            }
        }
        if let Some(routes) = obj.get("routes").and_then(Value::as_array) {
            for r in routes {
                let Some(dst) = r
                    .get("dst")
                    .and_then(Value::as_str)
                    .and_then(|d| d.parse().ok())
                else {
                    continue;
                };
                out.routes.push(Route {
                    dst,
                    gw: r
                        .get("gw")
                        .and_then(Value::as_str)
                        .and_then(|g| g.parse().ok()),
                    mtu: r
                        .get("mtu")
                        .and_then(Value::as_u64)
                        .and_then(|m| u32::try_from(m).ok()),
                });
            }
        }
        if let Some(d) = obj.get("dns") {
            out.dns = serde_json::from_value(d.clone()).unwrap_or_default();
        }
        Ok(out)
    }

    /// Append `other` after `self`, shifting its interface indexes.
    pub fn append(&mut self, other: CniResult) {
        let base = self.interfaces.len();
        self.interfaces.extend(other.interfaces);
        self.ips.extend(other.ips.into_iter().map(|mut ip| {
            ip.interface = ip.interface.map(|i| i + base);
            ip
        }));
        self.routes.extend(other.routes);
        if self.dns == Dns::default() {
            self.dns = other.dns;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![
                Interface {
                    name: "slabc".into(),
                    mac: "02:00:00:00:00:01".into(),
                    sandbox: None,
                    mtu: Some(65535),
                },
                Interface {
                    name: "eth0".into(),
                    mac: "02:00:00:00:00:02".into(),
                    sandbox: Some("/run/netns/x".into()),
                    mtu: Some(65535),
                },
            ],
            ips: vec![IpConfig {
                address: "10.244.1.2/32".parse().unwrap(),
                gateway: Some(Ipv4Addr::new(169, 254, 1, 1)),
                interface: Some(1),
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some(Ipv4Addr::new(169, 254, 1, 1)),
                mtu: Some(1450),
            }],
            dns: Dns::default(),
        }
    }

    #[test]
    fn versions_render_their_fields() {
        let r = sample();
        let v04 = r.to_json("0.4.0");
        assert_eq!(v04["ips"][0]["version"], "4");
        assert!(v04["routes"][0].get("mtu").is_none());
        let v10 = r.to_json("1.0.0");
        assert!(v10["ips"][0].get("version").is_none());
        assert!(v10["interfaces"][0].get("mtu").is_none());
        let v11 = r.to_json("1.1.0");
        assert_eq!(v11["routes"][0]["mtu"], 1450);
        assert_eq!(v11["interfaces"][1]["sandbox"], "/run/netns/x");
    }

    #[test]
    fn round_trip_through_json() {
        let r = sample();
        for v in ["0.4.0", "1.0.0", "1.1.0"] {
            let back = CniResult::from_json(&r.to_json(v)).unwrap();
            assert_eq!(back.ips, r.ips);
            assert_eq!(back.interfaces.len(), 2);
        }
    }

    #[test]
    fn append_shifts_interfaces() {
        let mut a = sample();
        a.append(sample());
        assert_eq!(a.ips[1].interface, Some(3));
    }
}
