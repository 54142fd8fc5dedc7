//! CNI errors: the spec's error object (`cniVersion`, `code`, `msg`, `details`) and its codes.
//!
//! Every failure of the plugin ends here and leaves the process as this JSON on stdout with a
//! non-zero exit status. Messages say what went wrong and what a person can do about it.

use serde_json::json;

/// A well-known CNI error code (spec 1.1, "Error"), plus the plugin-specific ones (100+).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Code {
    /// Incompatible CNI version.
    IncompatibleVersion = 1,
    /// Unsupported field in the network configuration.
    UnsupportedField = 2,
    /// Container unknown or does not exist.
    ContainerUnknown = 3,
    /// Invalid necessary environment variables.
    InvalidEnvironment = 4,
    /// I/O failure.
    Io = 5,
    /// Failed to decode content.
    Decode = 6,
    /// Invalid network config.
    InvalidConfig = 7,
    /// Try again later.
    TryAgainLater = 11,
    /// STATUS: the plugin cannot service ADD requests.
    NotAvailable = 50,
    /// STATUS: the plugin cannot service ADD and existing containers may have limited connectivity.
    NotAvailableLimitedConnectivity = 51,
    /// CHECK: the attachment differs from what ADD wired (plugin-specific code).
    Drift = 100,
}

/// A CNI error as the plugin reports it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("CNI error {}: {msg}{}", *code as u32, details.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
pub struct CniError {
    pub code: Code,
    pub msg: String,
    pub details: Option<String>,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: None,
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = Some(details.into());
        self
    }

    /// The spec's error object, in the caller's `cniVersion`.
    pub fn to_json(&self, cni_version: &str) -> serde_json::Value {
        let mut v = json!({ "cniVersion": cni_version, "code": self.code as u32, "msg": self.msg });
        if let Some(details) = &self.details {
            v["details"] = json!(details);
        }
        v
    }
}

/// Shorthand constructors.
pub fn io(msg: impl Into<String>) -> CniError {
    CniError::new(Code::Io, msg)
}

pub fn config(msg: impl Into<String>) -> CniError {
    CniError::new(Code::InvalidConfig, msg)
}

pub fn env(msg: impl Into<String>) -> CniError {
    CniError::new(Code::InvalidEnvironment, msg)
}

pub fn again(msg: impl Into<String>) -> CniError {
    CniError::new(Code::TryAgainLater, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_spec_fields() {
        let e = config("bad subnet").with_details("x");
        let v = e.to_json("1.0.0");
        assert_eq!(v["code"], 7);
        assert_eq!(v["msg"], "bad subnet");
        assert_eq!(v["details"], "x");
        assert_eq!(v["cniVersion"], "1.0.0");
        let v = again("later").to_json("1.1.0");
        assert!(v.get("details").is_none());
    }
}
