#!/usr/bin/env bash
# The main job, offline: draws a dozen shape scenes and a slideshow video,
# embeds them with the bundled demo model into a Parquet table (one row per
# image and per 4-second video segment), searches it with text queries and
# labels every image and segment zero-shot (`mmembed classify`, BigQuery's
# AI.CLASSIFY run offline). Arguments replace the default queries.
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
labels=target/demo-labels.jsonl
echo "==> $mmembed classify $media --labels 'star,square,circle,triangle,ring,cross' -o $labels --model demo --interval 4"
"$mmembed" classify "$media" --labels 'star,square,circle,triangle,ring,cross' \
  --label-template 'a {}' -o "$labels" --model demo --interval 4 --overwrite
# file, video segment and label of each row (the table has the
# probabilities in full_response too)
sed -E 's/^\{"uri":"([^"]*)".*"video_start_sec":([^,]*),"video_end_sec":([^,]*),"result":("[^"]*"|null).*"status":"(.*)"\}$/\1  [\2-\3 s]  \4 \5/' "$labels" |
  sed -e "s|$PWD/||" -e 's/  \[null-null s\]//'

echo "==> to look at the results in a browser: $mmembed serve --search-in $table   (then open http://127.0.0.1:8080/)"
