#!/bin/bash
# Memory and time of a batch job's end (the final merge, and --resume over a
# large output), for one or more mmembed binaries, alternated:
#
#   PYTHON=venv/bin/python scripts/merge-bench.sh DIR BIN [BIN...]
#
# Makes in DIR 200 parts of 5,000 rows with 512-float vectors (1,000,000
# rows, 2.1 GB, labelled with the tiny fixture model so that resuming with
# it is allowed) with pyarrow, then for each binary and round: (A) merges
# them (an empty input and --resume: nothing to embed, only the merge), and
# (B) resumes over A's output with 100 new JPEGs from JPEGS (default: the
# committed fixture photo copied 100 times under new names).
# PYTHON needs pyarrow and numpy (scripts/test.sh makes such a venv); the
# figures come from GNU time (`apt-get install time`).
set -euo pipefail
dir=${1:?usage: scripts/merge-bench.sh DIR BIN [BIN...]}; shift
[ $# -gt 0 ] || { echo "name at least one mmembed binary"; exit 2; }
PY=${PYTHON:-python3}
root=$(cd "$(dirname "$0")/.." && pwd)
model=$root/models/fixtures/tiny-clip
rounds=${ROUNDS:-2}
mkdir -p "$dir/empty" "$dir/new"
if [ ! -d "$dir/parts" ]; then
  echo ">> a one-row output of the tiny model, for its schema and space"
  "$1" batch "$root/models/fixtures/images/rocket_640x427.jpg" -o "$dir/ref.parquet" --model "$model" --overwrite >/dev/null 2>&1
  echo ">> 200 parts x 5,000 rows with pyarrow into $dir/parts"
  "$PY" - "$dir" <<'PY'
import os, sys
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
d = sys.argv[1]
ref = pq.read_table(f"{d}/ref.parquet")
one = lambda c: ref[c][0].as_py()
os.makedirs(f"{d}/parts", exist_ok=True)
rng = np.random.default_rng(0)
n, dim = 5000, 512
for p in range(1, 201):
    k = (p - 1) * n
    emb = rng.standard_normal((n, dim), dtype=np.float32)
    t = pa.table({
        "uri": [f"/data/photos/{k + i:08d}.jpg" for i in range(n)],
        "content_type": ["image/jpeg"] * n,
        "size_bytes": pa.array(np.full(n, 123456), pa.int64()),
        "generation": pa.array([None] * n, pa.string()),
        "etag": pa.array([None] * n, pa.string()),
        "updated": pa.array(np.full(n, 1733000000123456), pa.timestamp("us", tz="UTC")),
        "embedding": pa.ListArray.from_arrays(pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32)), pa.array(emb.ravel())),
        "status": [""] * n,
        "video_start_sec": pa.array([None] * n, pa.float64()),
        "video_end_sec": pa.array([None] * n, pa.float64()),
        "model": [one("model")] * n,
        "space": [one("space")] * n,
        "dimension": pa.array(np.full(n, one("dimension")), pa.int32()),
    }).cast(ref.schema)
    pq.write_table(t, f"{d}/parts/part-{p:06d}.parquet", compression="snappy")
PY
fi
if [ -n "${JPEGS:-}" ]; then
  find "$JPEGS" -maxdepth 1 -name '*.jpg' | head -100 | xargs -I{} cp {} "$dir/new/"
else
  for i in $(seq -w 1 100); do cp "$root/models/fixtures/images/rocket_640x427.jpg" "$dir/new/p$i.jpg"; done
fi
for round in $(seq "$rounds"); do
  for bin in "$@"; do
    rm -rf "$dir/out.parquet" "$dir/out.parquet.parts"
    cp -r "$dir/parts" "$dir/out.parquet.parts"
    /usr/bin/time -f "A merge only, $bin, round $round: wall %e s, user %U s, system %S s, max RSS %M KB" \
      "$bin" batch "$dir/empty" -o "$dir/out.parquet" --resume --model "$model" 2>&1 | grep -E "^rows:|wall"
    /usr/bin/time -f "B resume + $(ls "$dir/new" | wc -l) new files, $bin, round $round: wall %e s, user %U s, system %S s, max RSS %M KB" \
      "$bin" batch "$dir/new" -o "$dir/out.parquet" --resume --model "$model" 2>&1 | grep -E "^rows:|wall"
  done
done
