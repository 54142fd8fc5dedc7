//! The network configuration read from stdin, parsed without trusting it.
//!
//! `parse` accepts any bytes and never panics: malformed JSON is code 6, an unsupported
//! `cniVersion` code 1, a well-formed but invalid configuration code 7. Keys this plugin does not
//! know are ignored (runtimes add their own, e.g. `capabilities`, `runtimeConfig` entries).
//!
//! Sluice's own keys (all optional):
//! ```json
//! {
//!   "cniVersion": "1.0.0", "name": "sluice", "type": "sluice-cni",
//!   "agent": true,                           // false: standalone, no agent, needs ipam.subnet
//!   "agentSocket": "/run/sluice/agent.sock",
//!   "agentTimeoutMs": 5000,
//!   "clusterCidr": "10.244.0.0/16",          // overrides the agent's
//!   "serviceCidr": "10.96.0.0/12",           // overrides the agent's
//!   "dataDir": "/var/lib/sluice/ipam",       // the plugin's state when IPAM is delegated
//!   "mtu": 1450,                             // the pod interface MTU, as bridge and ptp spell it
//!   "sluiceMtu": { "mode": "routes", "podMtu": 65535, "underlayMtu": 1500, "plainMtu": 1450 },
//!   "ipam": { "subnet": "10.244.1.0/24", "dataDir": "/var/lib/sluice/ipam" }
//! }
//! ```
//! An `ipam` section with a `type` other than `sluice` is delegated to that plugin (CNI_PATH).
//!
//! MTU keys: `mtu` is an integer, the pod interface MTU (both veth ends), with the meaning it has
//! for the reference plugins (bridge, ptp), Calico and Flannel's delegate. It is the mode's own
//! interface MTU: `podMtu` in `routes` mode (route MTUs are capped at it), `plainMtu` in `plain`
//! mode; giving both with different values is code 7. Sluice's richer settings live under
//! `sluiceMtu`. The object under `mtu` that earlier versions read is still accepted as a
//! deprecated spelling of `sluiceMtu` (a note on stderr says so); both at once is code 7.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnet::Ipv4Net;
use serde::Deserialize;

use crate::error::{CniError, Code};

/// The `cniVersion`s this plugin speaks; answers are given in the caller's.
pub const SUPPORTED_VERSIONS: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];

/// Default directory of the built-in IPAM's state (one subdirectory per network name).
pub const DEFAULT_IPAM_DIR: &str = "/var/lib/sluice/ipam";

/// Default timeout of one agent call.
pub const DEFAULT_AGENT_TIMEOUT_MS: u64 = 5000;

/// The network configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// Whether a node agent is expected (default). `false` is standalone mode.
    #[serde(default = "yes")]
    pub agent: bool,
    #[serde(default)]
    pub agent_socket: Option<PathBuf>,
    #[serde(default)]
    pub agent_timeout_ms: Option<u64>,
    #[serde(default)]
    pub cluster_cidr: Option<Ipv4Net>,
    /// The service CIDR (ClusterIPs); routed at the large pod MTU like the cluster CIDR.
    #[serde(default)]
    pub service_cidr: Option<Ipv4Net>,
    /// Directory of the plugin's own state (attachment records); `ipam.dataDir` overrides it
    /// for the built-in IPAM. A delegated IPAM plugin keeps `ipam.dataDir` to itself.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// `mtu`: the pod interface MTU (an integer, as the reference plugins spell it).
    #[serde(default)]
    pub mtu: Option<u32>,
    /// `sluiceMtu`: how pod interface and route MTUs are set.
    #[serde(default)]
    pub sluice_mtu: MtuConf,
    /// Things the caller should change in its configuration (deprecated spellings), for stderr.
    #[serde(skip)]
    pub notes: Vec<String>,
    #[serde(default)]
    pub ipam: IpamConf,
    #[serde(default)]
    pub runtime_config: RuntimeConf,
    #[serde(default)]
    pub prev_result: Option<serde_json::Value>,
    /// GC: the attachments the runtime still knows.
    #[serde(rename = "cni.dev/valid-attachments", default)]
    pub valid_attachments: Option<Vec<ValidAttachment>>,
}

fn yes() -> bool {
    true
}

/// How pod MTUs are set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MtuMode {
    /// A large interface MTU with per-route MTUs (DESIGN's strategy).
    #[default]
    Routes,
    /// One MTU (`plainMtu`, 1450 by default) on the interface, no per-route MTUs (Flannel's way).
    Plain,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MtuConf {
    #[serde(default)]
    pub mode: MtuMode,
    /// Interface MTU and MTU of the route to the node's own pod CIDR (routes mode).
    pub pod_mtu: Option<u32>,
    /// Underlay MTU; other nodes and the default route get this minus the VXLAN overhead (50).
    pub underlay_mtu: Option<u32>,
    /// The interface MTU in plain mode.
    pub plain_mtu: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamConf {
    /// Absent or `sluice`: the built-in allocator. Anything else: a delegated IPAM plugin.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// The pod CIDR to allocate from (required in standalone mode, overrides the agent's).
    pub subnet: Option<Ipv4Net>,
    /// State directory; the network name is appended.
    pub data_dir: Option<PathBuf>,
}

impl IpamConf {
    /// The delegated plugin's type, if any.
    pub fn delegate(&self) -> Option<&str> {
        match self.kind.as_deref() {
            None | Some("") | Some("sluice") => None,
            Some(other) => Some(other),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeConf {
    #[serde(default)]
    pub port_mappings: Vec<PortMapping>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub host_ip: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

impl NetConf {
    pub fn agent_socket(&self) -> PathBuf {
        self.agent_socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(sluice_control::agent_client::DEFAULT_AGENT_SOCKET))
    }

    pub fn agent_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.agent_timeout_ms.unwrap_or(DEFAULT_AGENT_TIMEOUT_MS))
    }

    /// The state directory (built-in IPAM and attachment records) of this network.
    pub fn ipam_dir(&self) -> PathBuf {
        let own = match self.ipam.delegate() {
            None => self.ipam.data_dir.clone().or_else(|| self.data_dir.clone()),
            Some(_) => self.data_dir.clone(),
        };
        own.unwrap_or_else(|| PathBuf::from(DEFAULT_IPAM_DIR))
            .join(&self.name)
    }
}

/// Parse a network configuration from stdin's bytes.
pub fn parse(bytes: &[u8]) -> Result<NetConf, CniError> {
    let mut value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        CniError::new(
            Code::Decode,
            format!("network configuration on stdin is not valid JSON: {e}"),
        )
    })?;
    cni_version_of(&value)?;
    reject_ipv6(&value)?;
    let notes = normalize_mtu(&mut value)?;
    if let Some(settings) = value.get("sluiceMtu") {
        // Checked on its own first so that the error names the key.
        MtuConf::deserialize(settings)
            .map_err(|e| crate::error::config(format!("sluiceMtu: {e}")))?;
    }
    let mut conf: NetConf = serde_json::from_value(value)
        .map_err(|e| crate::error::config(format!("invalid network configuration: {e}")))?;
    conf.notes = notes;
    validate(&conf)?;
    Ok(conf)
}

/// Check the `mtu` key (an integer, the interface MTU) and move the object earlier versions read
/// there to `sluiceMtu`, returning a note that says so. Code 7 for anything else under `mtu`, or
/// for the object form next to `sluiceMtu`.
fn normalize_mtu(value: &mut serde_json::Value) -> Result<Vec<String>, CniError> {
    let Some(obj) = value.as_object_mut() else {
        return Ok(Vec::new());
    };
    match obj.get("mtu") {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(serde_json::Value::Object(_)) => {
            if obj.contains_key("sluiceMtu") {
                return Err(crate::error::config(
                    "both \"sluiceMtu\" and an object under \"mtu\" are set; \"mtu\" is the interface MTU (an integer), keep the settings under \"sluiceMtu\" only",
                ));
            }
            if let Some(settings) = obj.remove("mtu") {
                obj.insert("sluiceMtu".into(), settings);
            }
            Ok(vec![
                "the object under \"mtu\" is deprecated: move it to \"sluiceMtu\" (\"mtu\" is the interface MTU, an integer, as bridge and ptp spell it)".into(),
            ])
        }
        Some(v) => match v.as_u64().and_then(|m| u32::try_from(m).ok()) {
            Some(m) if MTU_RANGE.contains(&m) => Ok(Vec::new()),
            _ => Err(crate::error::config(format!(
                "mtu {v} is not an interface MTU: give an integer in {}..={} (Sluice's MTU settings go under \"sluiceMtu\")",
                MTU_RANGE.start(),
                MTU_RANGE.end()
            ))),
        },
    }
}

/// The MTUs a configuration may give (interface, underlay, plain).
pub const MTU_RANGE: std::ops::RangeInclusive<u32> = 576..=65535;

/// The `cniVersion` of a configuration, checked against the supported ones (code 1 if not).
pub fn cni_version_of(value: &serde_json::Value) -> Result<String, CniError> {
    let Some(obj) = value.as_object() else {
        return Err(crate::error::config(
            "network configuration must be a JSON object",
        ));
    };
    let Some(version) = obj.get("cniVersion").and_then(|v| v.as_str()) else {
        return Err(crate::error::config(
            "network configuration has no \"cniVersion\" string; set it to one of 0.4.0, 1.0.0, 1.1.0",
        ));
    };
    if !SUPPORTED_VERSIONS.contains(&version) {
        return Err(CniError::new(
            Code::IncompatibleVersion,
            format!(
                "cniVersion {version:?} is not supported by sluice-cni; use one of {}",
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    Ok(version.to_string())
}

/// IPv6 ranges are a field this plugin understands but does not support yet: code 2, naming
/// the key and the value as the spec asks.
fn reject_ipv6(value: &serde_json::Value) -> Result<(), CniError> {
    let fields = [
        ("ipam.subnet", value.pointer("/ipam/subnet")),
        ("clusterCidr", value.get("clusterCidr")),
    ];
    for (key, v) in fields {
        if let Some(s) = v.and_then(|v| v.as_str()).filter(|s| s.contains(':')) {
            return Err(CniError::new(
                Code::UnsupportedField,
                format!("{key} {s:?}: IPv6 is not supported by sluice-cni yet; give an IPv4 CIDR"),
            ));
        }
    }
    Ok(())
}

fn validate(conf: &NetConf) -> Result<(), CniError> {
    if conf.name.is_empty()
        || conf.name.contains('/')
        || conf.name == "."
        || conf.name == ".."
        || conf.name.len() > 128
    {
        return Err(crate::error::config(format!(
            "network name {:?} is not usable: it must be non-empty, at most 128 bytes and contain no '/'",
            conf.name
        )));
    }
    if let Some(subnet) = conf.ipam.subnet
        && subnet.prefix_len() > 30
    {
        return Err(crate::error::config(format!(
            "ipam.subnet {subnet} is too small: it needs at least a /30 (network, gateway .1, broadcast are skipped)"
        )));
    }
    if !conf.agent && conf.ipam.subnet.is_none() && conf.ipam.delegate().is_none() {
        return Err(crate::error::config(
            "standalone mode (\"agent\": false) needs \"ipam\": {\"subnet\": \"<pod CIDR>\"} or a delegated ipam type",
        ));
    }
    let m = &conf.sluice_mtu;
    for (name, mtu) in [
        ("mtu", conf.mtu),
        ("sluiceMtu.podMtu", m.pod_mtu),
        ("sluiceMtu.underlayMtu", m.underlay_mtu),
        ("sluiceMtu.plainMtu", m.plain_mtu),
    ] {
        if let Some(mtu) = mtu
            && !MTU_RANGE.contains(&mtu)
        {
            return Err(crate::error::config(format!(
                "{name} {mtu} is out of range {}..={}",
                MTU_RANGE.start(),
                MTU_RANGE.end()
            )));
        }
    }
    if let Some(mtu) = m.underlay_mtu
        && mtu < MTU_RANGE.start() + crate::VXLAN_OVERHEAD
    {
        return Err(crate::error::config(format!(
            "sluiceMtu.underlayMtu {mtu} leaves no room for VXLAN's {} bytes",
            crate::VXLAN_OVERHEAD
        )));
    }
    let own = match m.mode {
        MtuMode::Routes => ("sluiceMtu.podMtu", m.pod_mtu),
        MtuMode::Plain => ("sluiceMtu.plainMtu", m.plain_mtu),
    };
    if let (Some(mtu), (name, Some(other))) = (conf.mtu, own)
        && mtu != other
    {
        return Err(crate::error::config(format!(
            "mtu {mtu} and {name} {other} disagree: both are the pod interface MTU; give one"
        )));
    }
    Ok(())
}

/// The gateway every pod routes through (a link-local address answered by a static neighbor).
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Code;
    use proptest::prelude::*;

    #[test]
    fn minimal_standalone() {
        let c = parse(br#"{"cniVersion":"1.0.0","name":"n","type":"sluice-cni","agent":false,"ipam":{"subnet":"10.244.1.0/24"},"whatever":{"x":1}}"#).unwrap();
        assert!(!c.agent);
        assert_eq!(c.ipam.subnet.unwrap().to_string(), "10.244.1.0/24");
        assert_eq!(c.ipam_dir(), PathBuf::from("/var/lib/sluice/ipam/n"));
    }

    #[test]
    fn codes() {
        assert_eq!(parse(b"{nope").unwrap_err().code, Code::Decode);
        assert_eq!(
            parse(br#"{"cniVersion":"0.3.1","name":"n","type":"t"}"#)
                .unwrap_err()
                .code,
            Code::IncompatibleVersion
        );
        assert_eq!(
            parse(br#"{"cniVersion":"1.0.0","type":"t"}"#)
                .unwrap_err()
                .code,
            Code::InvalidConfig
        );
        assert_eq!(
            parse(br#"{"cniVersion":"1.0.0","name":"n","type":"t","ipam":{"subnet":"x"}}"#)
                .unwrap_err()
                .code,
            Code::InvalidConfig
        );
        assert_eq!(
            parse(br#"{"cniVersion":"1.0.0","name":"n","type":"t","agent":false}"#)
                .unwrap_err()
                .code,
            Code::InvalidConfig
        );
        assert_eq!(
            parse(br#"{"cniVersion":"1.0.0","name":"../x","type":"t"}"#)
                .unwrap_err()
                .code,
            Code::InvalidConfig
        );
        assert_eq!(parse(b"[]").unwrap_err().code, Code::InvalidConfig);
        let v6 =
            parse(br#"{"cniVersion":"1.0.0","name":"n","type":"t","ipam":{"subnet":"fd00::/64"}}"#)
                .unwrap_err();
        assert_eq!(v6.code, Code::UnsupportedField);
        assert!(v6.msg.contains("ipam.subnet") && v6.msg.contains("fd00::/64"));
    }

    #[test]
    fn mtu_keys() {
        let conf = |extra: &str| {
            parse(format!(r#"{{"cniVersion":"1.0.0","name":"n","type":"t"{extra}}}"#).as_bytes())
        };
        let c = conf(r#","mtu":1450"#).unwrap();
        assert_eq!((c.mtu, c.sluice_mtu.pod_mtu), (Some(1450), None));
        assert!(c.notes.is_empty());
        let c = conf(r#","mtu":null"#).unwrap();
        assert_eq!(c.mtu, None);
        // Sluice's own key, and the same object where earlier versions read it (with a note).
        let c = conf(r#","sluiceMtu":{"mode":"plain","plainMtu":1400}"#).unwrap();
        assert_eq!(c.sluice_mtu.mode, MtuMode::Plain);
        assert_eq!(c.sluice_mtu.plain_mtu, Some(1400));
        assert!(c.notes.is_empty());
        let c = conf(r#","mtu":{"mode":"plain","plainMtu":1400}"#).unwrap();
        assert_eq!(
            (c.mtu, c.sluice_mtu.mode, c.sluice_mtu.plain_mtu),
            (None, MtuMode::Plain, Some(1400))
        );
        assert!(c.notes[0].contains("sluiceMtu"), "{:?}", c.notes);
        // The integer agrees with the mode's own interface MTU or is left alone.
        assert!(conf(r#","mtu":1400,"sluiceMtu":{"mode":"plain","plainMtu":1400}"#).is_ok());
        assert!(conf(r#","mtu":1400,"sluiceMtu":{"podMtu":1400}"#).is_ok());
        assert!(conf(r#","mtu":1400,"sluiceMtu":{"mode":"plain","podMtu":9000}"#).is_ok());
        // Code 7 for what is not an interface MTU, naming the key.
        for bad in [
            r#","mtu":"1450""#,
            r#","mtu":1450.5"#,
            r#","mtu":-1"#,
            r#","mtu":0"#,
            r#","mtu":575"#,
            r#","mtu":65536"#,
            r#","mtu":4294967296"#,
            r#","mtu":true"#,
            r#","mtu":[1450]"#,
            r#","mtu":1400,"sluiceMtu":{"podMtu":9000}"#,
            r#","mtu":1400,"sluiceMtu":{"mode":"plain","plainMtu":1450}"#,
            r#","mtu":{"mode":"plain"},"sluiceMtu":{"mode":"routes"}"#,
            r#","sluiceMtu":{"podMtu":70000}"#,
            r#","sluiceMtu":{"mode":"fast"}"#,
            r#","sluiceMtu":{"underlayMtu":600}"#,
        ] {
            let e = conf(bad).unwrap_err();
            assert_eq!(e.code, Code::InvalidConfig, "{bad}: {e}");
            assert!(e.msg.contains("mtu") || e.msg.contains("Mtu"), "{bad}: {e}");
        }
    }

    #[test]
    fn gc_attachments() {
        let c = parse(br#"{"cniVersion":"1.1.0","name":"n","type":"t","cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}]}"#).unwrap();
        assert_eq!(c.valid_attachments.unwrap()[0].container_id, "a");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn parse_never_panics_on_json_like(s in r#"\{("[a-zA-Z.]{0,12}":("[0-9./a-z]{0,16}"|[0-9]{1,6}|true|false|null|\{\}|\[\]),?){0,8}\}"#) {
            let _ = parse(s.as_bytes());
        }
    }
}
