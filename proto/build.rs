// Generates the prost types from proto/wpfs.proto (needs `protoc`, from
// Debian's protobuf-compiler; README and .ci/run install it).
fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=proto/wpfs.proto");
    prost_build::compile_protos(&["proto/wpfs.proto"], &["proto"])
}
