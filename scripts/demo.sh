#!/usr/bin/env bash
# The main job, offline: draws a dozen shape scenes, embeds them with the
# bundled demo model (models/demo) and ranks them against text queries.
# Arguments replace the default queries; --model DIR|ID and --images DIR
# work as in `cargo run --example rank -- --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/system-deps.sh
install_system_deps

export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
scenes=target/demo-scenes
echo "==> drawing demo scenes into $scenes"
rm -rf "$scenes"
cargo run --locked -q -p mmembed-shapes --example make-scenes -- "$scenes" 12 >/dev/null
ls "$scenes"
if [ "$#" -eq 0 ]; then
  set -- "a photo of a red star" "a blue square" "a small purple cross" "a large black circle in the center"
fi
case " $* " in
  *" --images "*) ;;
  *) set -- --images "$scenes" "$@" ;;
esac
case " $* " in
  *" --model "*) ;;
  *) set -- --model models/demo "$@" ;;
esac
exec cargo run --locked -q --example rank -- "$@"
