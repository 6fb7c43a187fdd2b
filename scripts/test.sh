#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, every test.
# Works on a fresh Debian machine with only Rust installed; installs any
# missing system package with apt-get first (and says so).
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/lib/system-deps.sh
. scripts/lib/python-venv.sh
. scripts/lib/storage-emulators.sh
install_system_deps
install_browser
install_aarch64_cross
# Early, so a missing Python fails in seconds rather than after the build.
python_venv tests/python/requirements.txt SDK_PY
# S3, GCS and Azure emulators for the bucket tests (started before `cargo test`).
python_venv tests/storage/requirements.txt STORAGE_PY
# Selenium for the search page's browser tests.
python_venv tests/search_page/requirements.txt PAGE_PY
# The CUDA 13.0 toolchain (nvcc, runtime, nvrtc, CCCL headers) from PyPI
# wheels, to compile and lint the `cuda` feature without a GPU (GPU.md).
python_venv scripts/lib/cuda-requirements.txt CUDA_PY
CUDA_HOME_WHEELS=$("$CUDA_PY" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
# The Python package's tests (maturin, numpy, pyarrow, pytest, Ray, Daft:
# about 800 MB installed) get their venv in the background while Rust
# compiles; it is waited for before they run.
PKG_PY=$(venv_python tests/python_pkg/requirements.txt)
(set -o pipefail; python_venv tests/python_pkg/requirements.txt _ 2>&1 | sed -u 's/^/[python package venv] /') &
PKG_VENV_PID=$!

for c in rustfmt clippy; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^$c"; then
    echo ">> installing rustup component $c"
    rustup component add "$c"
  fi
done

echo ">> cargo fmt --check"
cargo fmt --all -- --check
echo ">> cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings
# No GPU can be asked for its compute capability here: build candle's
# kernels for Hopper (9.0, the H200 test machine). `check`/`clippy` never
# link, so no libcuda.so is needed; most of this step is nvcc compiling
# candle-kernels' PTX (about 10 minutes on 2 cores, once per clean build).
# Without default features, so the same build also proves that the facade
# and the CLI compile without video (FFmpeg): a separate `cargo check` of
# that configuration cost 4 minutes of CI on its own.
echo ">> cargo clippy --no-default-features --features cuda (mmembed-candle, the facade, the CLI: CUDA, and text + image only without FFmpeg; nvcc from $CUDA_HOME_WHEELS, CUDA_COMPUTE_CAP=90)"
PATH="$CUDA_HOME_WHEELS/bin:$PATH" CUDA_ROOT="$CUDA_HOME_WHEELS" CUDA_PATH="$CUDA_HOME_WHEELS" CUDA_COMPUTE_CAP=90 \
  cargo clippy -p mmembed-candle -p mmembed -p mmembed-cli --no-default-features --features cuda --all-targets --locked -- -D warnings
start_storage_emulators "$STORAGE_PY"
echo ">> cargo test (bucket tests against S3 at $MMEMBED_TEST_S3, GCS at $MMEMBED_TEST_GCS, Azure at $MMEMBED_TEST_AZURE)"
# PYO3_BUILD_EXTENSION_MODULE: the Python module (an example of
# mmembed-python) is built as an extension, not linked to libpython.
# Bounded, so a test that hangs fails this run in minutes instead of
# running into CI's limit (cargo names it "running for over 60 seconds").
PYO3_BUILD_EXTENSION_MODULE=1 timeout -k 30 2400 cargo test --workspace --locked || {
  rc=$?
  [ "$rc" = 124 ] && echo "!! cargo test ran past 40 minutes: a test hung (the one running for over 60 seconds above)"
  exit "$rc"
}
# The CPU kernels again on their AVX2 paths (an AVX-512 machine ran its own
# above; AVX2-only CPUs, Zen 2/3 and Intel's client cores, run these): the
# kernels' unit tests and the model fixtures against PyTorch. Nothing is
# rebuilt (the same features); about 45 seconds.
echo ">> the CPU kernels on AVX2 (MMEMBED_NO_AVX512=1 MMEMBED_NO_VNNI=1): their unit tests and the PyTorch fixtures"
export PYO3_BUILD_EXTENSION_MODULE=1 MMEMBED_NO_AVX512=1 MMEMBED_NO_VNNI=1
cargo test --workspace --locked --lib -q -- packed:: fastvit:: int8:: w8a8:: tiled:: model:: cpu_kernels::
cargo test --workspace --locked --test parity -q
unset PYO3_BUILD_EXTENSION_MODULE MMEMBED_NO_AVX512 MMEMBED_NO_VNNI
# The model and media crates built for aarch64 (Graviton, Ampere; Apple
# silicon shares their code paths), where none of the x86 kernels exist
# (packed f32, int8, FastViT's fused blocks, the resampling loops): linted,
# then their unit tests and the PyTorch fixtures run under qemu-aarch64.
# Left out: the fixtures of the GPU graphs run on the CPU and of f16/bf16 on
# the CPU (no code of ours differs per architecture there; 9 of the 11
# emulated minutes the fixtures would take). No FFmpeg for aarch64 is
# needed: neither crate needs video for these tests.
echo ">> mmembed-candle and mmembed-media for aarch64: clippy, then their unit tests and the PyTorch fixtures under qemu-aarch64 (about 9 minutes)"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
  CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
cargo clippy -p mmembed-candle -p mmembed-media --all-targets --locked --target aarch64-unknown-linux-gnu -- -D warnings
cargo test -p mmembed-candle -p mmembed-media --locked --target aarch64-unknown-linux-gnu --lib --test parity -q -- \
  --skip cuda_graph_matches_pytorch --skip cublas_graph_matches_pytorch --skip portable_kernels_in_half_precision_match_pytorch
unset CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER
# `cargo test` built target/debug/mmembed for the CLI's tests; the SDK tests
# start it as `mmembed serve --model demo` on a loopback port.
echo ">> the official Vertex AI Python SDK against mmembed serve (REST and gRPC)"
MMEMBED_BIN=target/debug/mmembed HF_HUB_OFFLINE=1 "$SDK_PY" -m pytest -q -p no:cacheprovider tests/python
# The Python package: its Python sources beside the extension module that
# `cargo test` just built as the example `mmembed_native` (with the
# workspace's features, so nothing is compiled again: a wheel of the
# package alone would recompile most of the tree, 10 minutes here).
# `maturin sdist` checks the packaging that `pip install` goes through.
wait "$PKG_VENV_PID" || { echo "!! the Python package's venv could not be made (see above)"; exit 1; }
echo ">> maturin sdist (the package's build metadata) and the Python package from cargo test's build in target/python-pkg"
mkdir -p target/python-pkg
"$(dirname "$PKG_PY")/maturin" sdist -m crates/mmembed-python/Cargo.toml -o target/python-pkg/sdist
rm -rf target/python-pkg/mmembed
cp -r crates/mmembed-python/python/mmembed target/python-pkg/
cp target/debug/examples/libmmembed_native.so target/python-pkg/mmembed/_native.abi3.so
echo ">> the Python package: API, Ray Data, Daft, array jobs (pytest)"
PYTHONPATH="$PWD/target/python-pkg" MMEMBED_BIN=target/debug/mmembed MMEMBED_MAKE_SCENES=target/debug/examples/make-scenes HF_HUB_OFFLINE=1 \
  "$PKG_PY" -m pytest -q -p no:cacheprovider tests/python_pkg
echo ">> the search page in Debian's chromium (WebDriver): text and image queries, video segments, no path traversal"
MMEMBED_BIN=target/debug/mmembed MMEMBED_MAKE_SCENES=target/debug/examples/make-scenes MMEMBED_TEST_ARTIFACTS="$PWD/target/test-artifacts" \
  "$PAGE_PY" -m pytest -q -p no:cacheprovider tests/search_page
echo ">> screenshots of the search page: target/test-artifacts/search-page-*.png"
