//! Compiles the `.proto` contracts with a vendored `protoc`, so no system protoc is needed,
//! and writes the file descriptor set that server reflection serves.
use std::{env, path::PathBuf};

const PROTOS: &[&str] = &["proto/tmws/v1/memory.proto", "proto/tmws/v1/workflow.proto", "proto/tmws/v1/agent.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; this only configures prost-build's protoc lookup.
    unsafe { env::set_var("PROTOC", protoc) };

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .file_descriptor_set_path(out_dir.join("tmws_descriptor.bin"))
        .compile_protos(PROTOS, &["proto"])?;

    println!("cargo:rerun-if-changed=build.rs");
    // sqlx::migrate! embeds these at compile time.
    println!("cargo:rerun-if-changed=migrations");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
