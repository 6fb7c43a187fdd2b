#!/bin/bash
# Memory and time of a row job (`mmembed generate`) over a large table, for
# one or more mmembed binaries, alternated:
#
#   PYTHON=venv/bin/python scripts/rowjob-bench.sh DIR BIN [BIN...]
#
# Starts a fast stand-in chat server on loopback (scripts/lib/fake_openai.py),
# makes in DIR an input of 1,000,000 rows (`id`, `city`) and 200 parts of
# 5,000 answered rows of it with pyarrow (labelled with the recipe of a real
# 1,000-row run, so that resuming is allowed), then for each binary and
# round: (A) merges the parts (the whole input is done: only the merge),
# (B) resumes over A's output with 1,000 new input rows, (C) answers the
# first 100,000 rows from nothing. PYTHON needs pyarrow; the figures come
# from GNU time (`apt-get install time`).
set -euo pipefail
dir=${1:?usage: scripts/rowjob-bench.sh DIR BIN [BIN...]}; shift
[ $# -gt 0 ] || { echo "name at least one mmembed binary"; exit 2; }
PY=${PYTHON:-python3}
root=$(cd "$(dirname "$0")/.." && pwd)
rounds=${ROUNDS:-2}
port=${PORT:-18556}
mkdir -p "$dir"
python3 "$root/scripts/lib/fake_openai.py" "$port" &
server=$!
trap 'kill $server 2>/dev/null' EXIT
sleep 1
gen=(-g "openai:http://127.0.0.1:$port?model=m" --prompt 'What is the capital of {city}?' --concurrency 32 --rpm 100000000)
if [ ! -d "$dir/parts" ]; then
  echo ">> a 1,000-row run for the output's schema and recipe"
  "$PY" -c "
import csv, sys
w = csv.writer(open(sys.argv[1], 'w', newline='')); w.writerow(['id', 'city'])
for i in range(1000): w.writerow([i, f'city number {i}'])" "$dir/small.csv"
  "$1" generate "$dir/small.csv" -o "$dir/ref.parquet" --overwrite "${gen[@]}" >/dev/null 2>&1
  echo ">> the input (1,000,000 rows, and 1,000 more) and 200 parts x 5,000 rows with pyarrow into $dir"
  "$PY" - "$dir" <<'PY'
import csv, json, os, sys
import pyarrow as pa, pyarrow.parquet as pq
d = sys.argv[1]
meta = pq.read_schema(f"{d}/ref.parquet").metadata
N, P = 1_000_000, 200
for name, n in (("big.csv", N), ("big2.csv", N + 1000), ("first100k.csv", 100_000)):
    with open(f"{d}/{name}", "w", newline="") as f:
        w = csv.writer(f); w.writerow(["id", "city"])
        for i in range(n): w.writerow([i, f"city number {i}"])
os.makedirs(f"{d}/parts", exist_ok=True)
n = N // P
for p in range(P):
    ids = range(p * n, (p + 1) * n)
    res = [f"A short answer to: What is the capital of city number {i}?" for i in ids]
    full = [json.dumps({"id": "x", "object": "chat.completion", "model": "m", "choices": [{"index": 0, "message": {"role": "assistant", "content": r}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 10, "completion_tokens": 12, "total_tokens": 22}}) for r in res]
    t = pa.table({"id": [str(i) for i in ids], "city": [f"city number {i}" for i in ids], "result": res, "full_response": full, "status": [""] * n}).replace_schema_metadata(meta)
    pq.write_table(t, f"{d}/parts/part-{p + 1:06d}.parquet", compression="snappy")
PY
fi
for round in $(seq "$rounds"); do
  for bin in "$@"; do
    rm -rf "$dir/out.parquet" "$dir/out.parquet.parts" "$dir/c.parquet"
    cp -r "$dir/parts" "$dir/out.parquet.parts"
    /usr/bin/time -f "A merge only, $bin, round $round: wall %e s, user %U s, system %S s, max RSS %M KB" \
      "$bin" generate "$dir/big.csv" -o "$dir/out.parquet" --resume "${gen[@]}" 2>&1 | grep -E "^rows:|wall"
    /usr/bin/time -f "B resume + 1000 new rows, $bin, round $round: wall %e s, user %U s, system %S s, max RSS %M KB" \
      "$bin" generate "$dir/big2.csv" -o "$dir/out.parquet" --resume "${gen[@]}" 2>&1 | grep -E "^rows:|wall"
    /usr/bin/time -f "C 100,000 rows from nothing, $bin, round $round: wall %e s, user %U s, system %S s, max RSS %M KB" \
      "$bin" generate "$dir/first100k.csv" -o "$dir/c.parquet" "${gen[@]}" 2>&1 | grep -E "^rows:|wall"
  done
done
