//! Generates the gRPC code from ../../proto with a vendored protoc, so no system
//! protoc is needed. Every `bytes` field becomes `bytes::Bytes` (no copies).
//! The CSI spec (`proto/csi/v1/csi.proto`) imports protobuf's well-known
//! types; their .proto files come from the vendored protoc's include
//! directory and their Rust types from `prost-types`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        root.join("corral/v1/replica.proto"),
        root.join("corral/v1/engine.proto"),
        root.join("corral/v1/node.proto"),
        root.join("csi/v1/csi.proto"),
    ];
    let well_known = protoc_bin_vendored::include_path()?;
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    tonic_prost_build::configure()
        .bytes(".")
        .codec_path("crate::codec::SizedProstCodec")
        .compile_protos(&files, &[root, well_known])?;
    Ok(())
}
