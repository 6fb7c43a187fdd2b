#!/usr/bin/env bash
# The main job, offline: draws a dozen shape scenes and a slideshow video,
# embeds them with the bundled demo model into a Parquet table (one row per
# image and per 4-second video segment) and searches it with text queries.
# Arguments replace the default queries.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/system-deps.sh
install_system_deps

export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
media=target/demo-media
table=target/demo-media.parquet
echo "==> building"
cargo build --locked -q -p mmembed-cli -p mmembed-shapes --examples --bins
mmembed=target/debug/mmembed
echo "==> drawing demo scenes and a slideshow into $media"
rm -rf "$media"
cargo run --locked -q -p mmembed-shapes --example make-scenes -- "$media" 12 --slideshow | grep slideshow.mp4 || true
echo "==> $mmembed batch $media -o $table --model demo --interval 4"
"$mmembed" batch "$media" -o "$table" --model demo --interval 4 --overwrite
if [ "$#" -eq 0 ]; then
  set -- "a photo of a red star" "a blue square" "a small purple cross" "an orange ring"
fi
for q in "$@"; do
  echo "==> $mmembed search \"$q\" --in $table -k 3"
  "$mmembed" search "$q" --in "$table" -k 3
done
