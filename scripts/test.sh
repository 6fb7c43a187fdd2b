#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, every test.
# Works on a fresh Debian machine with only Rust installed; installs any
# missing system package with apt-get first (and says so).
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the build needs: a C compiler (ring, used by the hub
# client's TLS, has C and assembly parts). The list grows with the video
# feature (FFmpeg's -dev packages).
need_pkgs=()
command -v cc >/dev/null 2>&1 || need_pkgs+=(gcc libc6-dev)
if ((${#need_pkgs[@]})); then
  echo ">> installing system packages: ${need_pkgs[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need_pkgs[@]}"
fi
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
