#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, every test.
# Works on a fresh Debian machine with only Rust installed; installs any
# missing system package with apt-get first (and says so).
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/lib/system-deps.sh
. scripts/lib/python-venv.sh
install_system_deps
# Early, so a missing Python fails in seconds rather than after the build.
python_venv tests/python/requirements.txt

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
echo ">> build without default features (text + image only)"
cargo check -p mmembed --no-default-features --features local --locked
echo ">> cargo test"
cargo test --workspace --locked
# `cargo test` built target/debug/mmembed for the CLI's tests; the SDK tests
# start it as `mmembed serve --model demo` on a loopback port.
echo ">> the official Vertex AI Python SDK against mmembed serve (REST and gRPC)"
MMEMBED_BIN=target/debug/mmembed HF_HUB_OFFLINE=1 "$VENV_PY" -m pytest -q -p no:cacheprovider tests/python
