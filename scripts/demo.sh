#!/usr/bin/env bash
# The main job, offline: embeds the bundled photos with the local backend and
# ranks them against text queries. Extra arguments go to the example
# (e.g. --model DIR, --images DIR, "a query").
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cc >/dev/null 2>&1; then
  echo ">> installing system packages: gcc libc6-dev"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq gcc libc6-dev
fi
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
exec cargo run --locked --example rank -- "$@"
