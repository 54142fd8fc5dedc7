//! `sluice-cni`: reads `CNI_*` from the environment and the network configuration from stdin,
//! prints the result or the spec's error JSON on stdout, and exits 0 or 1.

use std::io::Read;
use std::process::ExitCode;

use sluice_cni::error::{CniError, io};
use sluice_cni::plugin;

/// Largest configuration accepted on stdin.
const MAX_STDIN: u64 = 16 << 20;

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let read = std::io::stdin().take(MAX_STDIN).read_to_end(&mut stdin);
    let version = plugin::caller_version(&stdin);
    let outcome: Result<Option<serde_json::Value>, CniError> = match read {
        Err(e) => Err(io(format!(
            "cannot read the network configuration from stdin: {e}"
        ))),
        Ok(_) => match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Err(e) => Err(io(format!("cannot start the async runtime: {e}"))),
            Ok(rt) => {
                let command = std::env::var("CNI_COMMAND").ok();
                rt.block_on(plugin::run(command.as_deref(), &stdin, |k| {
                    std::env::var(k).ok()
                }))
            }
        },
    };
    match outcome {
        Ok(Some(v)) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-cni: {e}");
            println!("{}", e.to_json(&version));
            ExitCode::FAILURE
        }
    }
}
