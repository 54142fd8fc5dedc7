//! The CNI environment variables, validated.

use std::collections::BTreeMap;

use crate::error::{CniError, env};

/// The verbs of CNI spec 1.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Gc,
    Status,
}

impl Command {
    pub fn parse(s: &str) -> Result<Self, CniError> {
        Ok(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "VERSION" => Self::Version,
            "GC" => Self::Gc,
            "STATUS" => Self::Status,
            other => {
                return Err(env(format!(
                    "CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, VERSION, GC, STATUS"
                )));
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Version => "VERSION",
            Self::Gc => "GC",
            Self::Status => "STATUS",
        }
    }
}

/// What the runtime passed in the environment for one attachment verb.
#[derive(Debug, Clone, Default)]
pub struct CniEnv {
    pub container_id: String,
    /// Empty when the runtime gave none (allowed for DEL).
    pub netns: String,
    pub ifname: String,
    pub args: BTreeMap<String, String>,
    pub path: Vec<String>,
}

impl CniEnv {
    /// Read the variables an attachment verb (ADD, DEL, CHECK) needs through `var`.
    pub fn read(cmd: Command, var: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let need = |name: &str| -> Result<String, CniError> {
            match var(name) {
                Some(v) if !v.is_empty() => Ok(v),
                _ => Err(env(format!(
                    "{name} is not set; the runtime must set it for {}",
                    cmd.as_str()
                ))),
            }
        };
        let container_id = need("CNI_CONTAINERID")?;
        if container_id.len() > 1024
            || !container_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        {
            return Err(env(format!(
                "CNI_CONTAINERID {container_id:?} must be letters, digits, '_', '.' or '-'"
            )));
        }
        let ifname = need("CNI_IFNAME")?;
        if ifname.len() > 15
            || ifname == "."
            || ifname == ".."
            || ifname
                .chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
        {
            return Err(env(format!(
                "CNI_IFNAME {ifname:?} is not a valid interface name (at most 15 bytes, no '/', ':' or spaces)"
            )));
        }
        let netns = match cmd {
            Command::Del => var("CNI_NETNS").unwrap_or_default(),
            _ => need("CNI_NETNS")?,
        };
        let args = parse_args(&var("CNI_ARGS").unwrap_or_default())?;
        let path = var("CNI_PATH")
            .unwrap_or_default()
            .split(':')
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect();
        Ok(Self {
            container_id,
            netns,
            ifname,
            args,
            path,
        })
    }

    pub fn k8s_namespace(&self) -> &str {
        self.args
            .get("K8S_POD_NAMESPACE")
            .map(String::as_str)
            .unwrap_or_default()
    }

    pub fn k8s_name(&self) -> &str {
        self.args
            .get("K8S_POD_NAME")
            .map(String::as_str)
            .unwrap_or_default()
    }
}

/// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`.
pub fn parse_args(s: &str) -> Result<BTreeMap<String, String>, CniError> {
    let mut out = BTreeMap::new();
    for pair in s.split(';').filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(env(format!("CNI_ARGS entry {pair:?} is not KEY=VALUE")));
        };
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_validates() {
        let vars = |k: &str| match k {
            "CNI_CONTAINERID" => Some("abc-1".to_string()),
            "CNI_IFNAME" => Some("eth0".to_string()),
            "CNI_NETNS" => Some("/run/netns/x".to_string()),
            "CNI_ARGS" => {
                Some("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web".to_string())
            }
            "CNI_PATH" => Some("/opt/cni/bin:/usr/lib/cni".to_string()),
            _ => None,
        };
        let e = CniEnv::read(Command::Add, vars).unwrap();
        assert_eq!(e.k8s_name(), "web");
        assert_eq!(e.path.len(), 2);
        assert!(CniEnv::read(Command::Add, |_| None).is_err());
        let no_netns = |k: &str| if k == "CNI_NETNS" { None } else { vars(k) };
        assert!(CniEnv::read(Command::Add, no_netns).is_err());
        assert!(CniEnv::read(Command::Del, no_netns).is_ok());
        let bad_if = |k: &str| {
            if k == "CNI_IFNAME" {
                Some("a/b".into())
            } else {
                vars(k)
            }
        };
        assert!(CniEnv::read(Command::Add, bad_if).is_err());
        assert!(parse_args("novalue").is_err());
        assert!(Command::parse("FOO").is_err());
    }
}
