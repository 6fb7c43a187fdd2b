// The extension module built as an example, so that `cargo test --workspace`
// compiles it with the workspace's unified features and reuses that build
// (see this crate's Cargo.toml); scripts/test.sh loads it from
// target/debug/examples/libmmembed_native.so.
include!("../src/lib.rs");
