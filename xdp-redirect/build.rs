//! Compiles `bpf/sluice.bpf.c` with clang and generates the libbpf-rs
//! skeleton (`$OUT_DIR/sluice.skel.rs`), which also carries the map key and
//! value types of `bpf/sluice.h`.

use std::env;
use std::path::PathBuf;

use libbpf_cargo::SkeletonBuilder;

const SRC: &str = "bpf/sluice.bpf.c";

fn main() {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("CARGO_CFG_TARGET_ARCH is set by cargo");
    // Debian keeps asm/types.h (needed by linux/bpf.h) under the multiarch
    // include directory, which clang's BPF target does not search.
    let multiarch = match arch.as_str() {
        "x86_64" => "x86_64-linux-gnu",
        "aarch64" => "aarch64-linux-gnu",
        other => other,
    };
    SkeletonBuilder::new()
        .source(SRC)
        .obj(out_dir.join("sluice.bpf.o"))
        .clang_args([
            format!("-I/usr/include/{multiarch}"),
            "-Ibpf".to_string(),
            "-Wall".to_string(),
        ])
        .build_and_generate(out_dir.join("sluice.skel.rs"))
        .expect("building the XDP program (bpf/sluice.bpf.c) failed");
    println!("cargo:rerun-if-changed={SRC}");
    println!("cargo:rerun-if-changed=bpf/sluice.h");
}
