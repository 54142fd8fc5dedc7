fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure().compile_protos(&["proto/agent.proto"], &["proto"])?;
    // control.proto's Observe and PushFlowEvents reuse the agent's messages (`crate::agent_api`).
    // Its imports are generated again (with the agent's messages left out), so it goes to its own
    // directory and only its own package is included (lib.rs).
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("control");
    std::fs::create_dir_all(&out)?;
    tonic_prost_build::configure()
        .out_dir(out)
        .extern_path(".sluice.agent.v1", "crate::agent_api")
        .compile_protos(&["proto/control.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
