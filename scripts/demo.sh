#!/usr/bin/env bash
# The main job, offline: embeds the bundled photos with the local backend and
# ranks them against text queries. Extra arguments go to the example
# (e.g. --model DIR, --images DIR, "a query").
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/system-deps.sh
install_system_deps

export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
exec cargo run --locked --example rank -- "$@"
