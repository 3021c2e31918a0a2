//! Compiles `proto/identity.proto`, the gRPC service's source of truth, into the
//! messages, server and client that `src/grpc.rs` includes, and writes the encoded
//! descriptor set that server reflection serves.
//!
//! protox parses the file in Rust, so a machine with only the Rust toolchain builds
//! the backend; tonic-prost-build then generates code from the parsed descriptors
//! instead of running `protoc` itself.

use std::path::PathBuf;

use prost::Message as _;

/// The descriptor set's file name in `OUT_DIR`; `src/grpc.rs` includes it by name.
const DESCRIPTOR_SET: &str = "identity_descriptor.bin";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/identity.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join(DESCRIPTOR_SET), descriptors.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
