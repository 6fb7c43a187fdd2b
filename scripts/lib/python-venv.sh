# A Python venv with pinned packages from PyPI, made once per requirements
# file and cached (keyed by the file's hash), so a rerun reuses it.
# Sourced by scripts/test.sh.
#
#   python_venv tests/python/requirements.txt SDK_PY   # sets SDK_PY to its python
#   venv_python tests/python/requirements.txt           # prints that python's path

# The venv's directory for a requirements file (keyed by the file's hash).
venv_dir() {
  local hash
  hash=$(sha256sum "$1" | cut -c1-12)
  echo "${MMEMBED_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mmembed}/venv-$hash"
}

venv_python() {
  echo "$(venv_dir "$1")/bin/python"
}

python_venv() {
  local req="$1" var="$2"
  if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    echo ">> installing Python (python3, python3-venv) with apt-get"
    local sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends python3 python3-venv
  fi
  local dir
  dir=$(venv_dir "$req")
  if [ ! -x "$dir/bin/python" ] || [ ! -f "$dir/.complete" ]; then
    echo ">> creating a Python venv in $dir and installing $req from PyPI (a few hundred MB, a minute or two)"
    rm -rf "$dir"
    python3 -m venv "$dir"
    "$dir/bin/pip" install --quiet --disable-pip-version-check -r "$req"
    touch "$dir/.complete"
  else
    echo ">> reusing the Python venv $dir"
  fi
  printf -v "$var" '%s' "$dir/bin/python"
}
