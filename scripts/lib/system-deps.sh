# Installs the Debian packages the build and tests need, when missing, and
# says so. Sourced by scripts/test.sh and scripts/demo.sh.
#
# - a C compiler: ring (TLS) and aws-lc (Google auth) have C parts;
# - pkg-config, libclang and FFmpeg's -dev libraries: ffmpeg-next links the
#   system's libavcodec/libavformat/libavutil/libswscale (feature `video`);
# - the ffmpeg CLI: tests make their videos with it;
# - libheif's -dev package: HEIC photos decode with the system's libheif
#   (feature `heif`, on by default in the CLI and the Python package);
# - cmake and nasm: turbojpeg-sys builds libjpeg-turbo (Pillow's JPEG
#   decoder, with its SIMD code) from source.
install_system_deps() {
  local pkgs=()
  command -v cc >/dev/null 2>&1 || pkgs+=(gcc libc6-dev)
  command -v cmake >/dev/null 2>&1 || pkgs+=(cmake)
  command -v nasm >/dev/null 2>&1 || pkgs+=(nasm)
  command -v pkg-config >/dev/null 2>&1 || pkgs+=(pkg-config)
  command -v ffmpeg >/dev/null 2>&1 || pkgs+=(ffmpeg)
  if ! pkg-config --exists libavcodec libavformat libavutil libswscale 2>/dev/null; then
    pkgs+=(libavcodec-dev libavformat-dev libavutil-dev libswscale-dev)
  fi
  pkg-config --exists libheif 2>/dev/null || pkgs+=(libheif-dev)
  # libclang itself (bindgen loads it), not libclang-cpp, which other
  # packages pull in and which bindgen cannot use.
  if ! ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/*/libclang-[0-9]*.so* >/dev/null 2>&1; then
    pkgs+=(libclang-dev)
  fi
  if ((${#pkgs[@]})); then
    apt_install "system packages" "${pkgs[@]}"
  fi
}

# apt_install WHAT PKG...: says what it installs and why, then installs it
# (through sudo when not root).
apt_install() {
  local what=$1
  shift
  echo ">> installing $what with apt-get: $*"
  local sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "$@"
}

# Debian's Chromium and its WebDriver, for the search page's browser tests.
install_browser() {
  if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    apt_install "the search page's browser for its tests" chromium chromium-driver
  fi
}

# What the aarch64 pass of the test command needs: Rust's standard library
# for aarch64-unknown-linux-gnu (rustup), Debian's cross C compiler (the
# build scripts of ring and aws-lc compile C for the target, and it links the
# test binaries) and qemu-user, which runs those binaries here.
install_aarch64_cross() {
  if ! rustup target list --installed 2>/dev/null | grep -qx aarch64-unknown-linux-gnu; then
    echo ">> installing Rust's aarch64-unknown-linux-gnu target with rustup (the aarch64 pass)"
    rustup target add aarch64-unknown-linux-gnu
  fi
  local pkgs=()
  command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || pkgs+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
  command -v qemu-aarch64 >/dev/null 2>&1 || pkgs+=(qemu-user)
  if ((${#pkgs[@]})); then
    apt_install "the aarch64 pass's cross compiler and emulator" "${pkgs[@]}"
  fi
}
