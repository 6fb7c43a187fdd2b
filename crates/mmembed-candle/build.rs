//! With the `cuda` feature: our CUDA kernels (`kernels/*.cu`) compiled to
//! PTX, one `&str` constant per file in `$OUT_DIR/ptx.rs` (`ROWS` for
//! `rows.cu`, `ATTENTION` for `attention.cu`, ...), loaded by the driver at
//! first use as candle loads its own. `convert.cuh`, which they include, is
//! watched: the builder's cache otherwise only sees the `.cu` files change.
//! Built by `cudaforge`, which compiles candle's kernels too: the same
//! nvcc (`CUDA_ROOT`, `PATH`), the same `CUDA_COMPUTE_CAP`.

#[cfg(feature = "cuda")]
fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let ptx = cudaforge::KernelBuilder::new()
        .source_dir("kernels")
        .watch(["kernels/convert.cuh"])
        .arg("-std=c++17")
        .arg("-O3")
        .build_ptx()
        .unwrap_or_else(|e| panic!("compiling kernels/*.cu with nvcc: {e}"));
    ptx.write(out.join("ptx.rs"))
        .unwrap_or_else(|e| panic!("writing {}: {e}", out.join("ptx.rs").display()));
}

#[cfg(not(feature = "cuda"))]
fn main() {
    println!("cargo::rerun-if-changed=build.rs");
}
