//! Compiles the `.proto` contracts with `protox` (a pure-Rust protobuf compiler), so building
//! pixmesh never needs a system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/pixmesh/v1/worker.proto", "proto/pixmesh/v1/registry.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(true).bytes(".pixmesh.v1").compile_fds(descriptors)?;
    Ok(())
}
