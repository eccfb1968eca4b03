//! Compiles `sluice/v1/*.proto` with protox, a protobuf compiler written in Rust, so building
//! Sluice never needs a system `protoc`.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "sluice/v1/resources.proto",
    "sluice/v1/discovery.proto",
    "sluice/v1/registry.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // Kept for gRPC reflection on the control plane.
    std::fs::write(
        out_dir.join("sluice_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        // BTreeMap keeps map fields ordered, so encoding a snapshot is deterministic and
        // its content hash depends only on its content.
        .btree_map(".")
        // Parts of a snapshot are slices of the one encoded copy, not copies of it.
        .bytes(".sluice.v1.SnapshotPart.data")
        .compile_fds(descriptors)?;
    Ok(())
}
