//! Generates the peer-traffic gRPC code from proto/calm/internal/v1. protoc comes from
//! protoc-bin-vendored, so a fresh machine needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment now.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=../proto/calm/internal/v1/raft.proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["../proto/calm/internal/v1/raft.proto"], &["../proto"])?;
    Ok(())
}
