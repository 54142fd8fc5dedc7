//! Delegated IPAM: run the plugin named by `ipam.type` from CNI_PATH with the same environment
//! (CNI_COMMAND as given) and the same network configuration on stdin, as the spec describes.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command as Process, Stdio};

use crate::env::Command;
use crate::error::{CniError, Code, io};
use crate::result::CniResult;

/// Find `plugin` in `path`.
pub fn find(plugin: &str, path: &[String]) -> Result<PathBuf, CniError> {
    if plugin.contains('/') || plugin.is_empty() {
        return Err(crate::error::config(format!(
            "ipam.type {plugin:?} is not a plugin name"
        )));
    }
    path.iter()
        .map(|d| PathBuf::from(d).join(plugin))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            crate::error::config(format!(
                "IPAM plugin {plugin:?} not found in CNI_PATH ({}); install it or fix ipam.type",
                path.join(":")
            ))
        })
}

/// Run the delegate with `cmd`; returns its stdout on success, its error otherwise.
pub fn exec(
    plugin: &str,
    path: &[String],
    cmd: Command,
    stdin: &[u8],
) -> Result<Vec<u8>, CniError> {
    let bin = find(plugin, path)?;
    let mut child = Process::new(&bin)
        .env("CNI_COMMAND", cmd.as_str())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| io(format!("cannot run IPAM plugin {}: {e}", bin.display())))?;
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin).map_err(|e| {
            io(format!(
                "cannot write to IPAM plugin {}: {e}",
                bin.display()
            ))
        })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| io(format!("IPAM plugin {} failed: {e}", bin.display())))?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    // Pass the delegate's own error on, naming it.
    let err: Option<serde_json::Value> = serde_json::from_slice(&out.stdout).ok();
    let code = err
        .as_ref()
        .and_then(|v| v.get("code"))
        .and_then(|c| c.as_u64())
        .unwrap_or(0);
    let msg = err
        .as_ref()
        .and_then(|v| v.get("msg"))
        .and_then(|m| m.as_str())
        .map(str::to_string)
        .unwrap_or_else(|| String::from_utf8_lossy(&out.stdout).into_owned());
    let code = match code {
        1 => Code::IncompatibleVersion,
        2 => Code::UnsupportedField,
        3 => Code::ContainerUnknown,
        4 => Code::InvalidEnvironment,
        6 => Code::Decode,
        7 => Code::InvalidConfig,
        11 => Code::TryAgainLater,
        _ => Code::Io,
    };
    Err(CniError::new(
        code,
        format!(
            "IPAM plugin {plugin} ({}) failed {}: {msg}",
            bin.display(),
            cmd.as_str()
        ),
    ))
}

/// ADD through the delegate: its result.
pub fn add(plugin: &str, path: &[String], stdin: &[u8]) -> Result<CniResult, CniError> {
    let out = exec(plugin, path, Command::Add, stdin)?;
    let v: serde_json::Value = serde_json::from_slice(&out).map_err(|e| {
        CniError::new(
            Code::Decode,
            format!("IPAM plugin {plugin} answered ADD with invalid JSON: {e}"),
        )
    })?;
    CniResult::from_json(&v)
}
