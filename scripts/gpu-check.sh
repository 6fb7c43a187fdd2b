#!/usr/bin/env bash
# The GPU check of issue #19, in one go (GPU.md).
#
#   scripts/gpu-check.sh build          here (no GPU needed): the CUDA 13
#                                       toolchain from PyPI wheels, link-time
#                                       stand-ins for the CUDA libraries, and
#                                       a release build of `mmembed` and
#                                       `gpu_check` with --features cuda for
#                                       compute capability 9.0 (Hopper), and
#                                       mmembed-candle's unit tests (their
#                                       on_cuda tests check our kernels), into
#                                       target/gpu-check/ (about 31 MB, xz)
#   scripts/gpu-check.sh run OUT        on the GPU machine (no Rust, no
#                                       network; its python3 with torch and
#                                       transformers): our kernels against
#                                       their references, every family's tiny
#                                       fixture against its committed PyTorch
#                                       embeddings, parity against PyTorch
#                                       on the same GPU, throughput side by
#                                       side, JPEG files end to end; writes
#                                       OUT/report.md and the raw JSON lines.
#                                       About 5.5 minutes on an H200 (336 s
#                                       in the first run), then torch.compile
#                                       if the rest took under 6 minutes.
#   scripts/gpu-check.sh quick OUT      on the GPU machine, after a change:
#                                       bf16 parity, model-only throughput
#                                       (ours, all graphs, and PyTorch eager)
#                                       and the Nsight Compute tables; about
#                                       two minutes.
#   scripts/gpu-check.sh dry-run OUT    here, on the CPU: the same steps on
#                                       the tiny fixture model with the debug
#                                       CPU builds, to check the script itself
#                                       (needs a Python with torch).
#
# With the device tool: build here, then run there with
#   carry ["target/gpu-check"], command "bash scripts/gpu-check.sh run $OUT"
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=target/gpu-check
say() { echo ">> [$(date +%T)] $*"; }
# One failed step is reported and the others still run: a GPU machine's
# time is short, and every figure that can be had is worth having.
failed() { echo "!! [$(date +%T)] $* failed; going on with the next step"; }

build() {
  . scripts/lib/system-deps.sh
  . scripts/lib/python-venv.sh
  install_system_deps
  python_venv scripts/lib/cuda-requirements.txt CUDA_PY
  local nv stubs cudarc
  nv=$("$CUDA_PY" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
  cargo fetch --locked >/dev/null
  cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$(awk '/^name = "cudarc"/{getline; print $3}' Cargo.lock | tr -d '"')" | head -1)
  stubs=$PWD/target/cuda-link-stubs
  say "link-time stand-ins for libcuda, libcublas(Lt), libcurand, libnvrtc in $stubs (see scripts/gpu/link_stubs.py)"
  python3 scripts/gpu/link_stubs.py "$cudarc" "$stubs"
  # candle-kernels' own CUDA C++ (its libmoe.a) links the CUDA runtime: the
  # wheel's real one, which has no unversioned name to link by.
  ln -sf "$nv/lib/libcudart.so.13" "$stubs/lib/stubs/libcudart.so"
  say "release build with --features cuda (CUDA_COMPUTE_CAP=90; nvcc from $nv): 20-30 minutes cold on 2 cores, most of it candle's kernels"
  # Its own target directory: the CUDA feature set would otherwise evict
  # the CPU build's artefacts, and the link step needs the stand-ins.
  PATH="$nv/bin:$PATH" CUDA_ROOT="$nv" CUDA_PATH="$nv" CUDA_TOOLKIT_ROOT_DIR="$stubs" CUDA_COMPUTE_CAP=90 \
    CARGO_TARGET_DIR=target/gpu-build \
    cargo build --release --locked -p mmembed-cli -p mmembed-candle --no-default-features \
      --features mmembed-cli/cuda,mmembed-candle/cuda --bin mmembed --example gpu_check
  # mmembed-candle's unit tests, built the same way: their `on_cuda` tests
  # hold each of our CUDA kernels to its reference on the GPU, before
  # anything else runs there.
  say "release build of mmembed-candle's unit tests with --features cuda (their on_cuda tests check our kernels on the GPU)"
  local tests
  tests=$(PATH="$nv/bin:$PATH" CUDA_ROOT="$nv" CUDA_PATH="$nv" CUDA_TOOLKIT_ROOT_DIR="$stubs" CUDA_COMPUTE_CAP=90 \
    CARGO_TARGET_DIR=target/gpu-build \
    cargo test --release --locked -p mmembed-candle --no-default-features --features cuda --lib --no-run \
      --message-format=json \
    | python3 -c 'import json, sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "mmembed_candle":
        print(m["executable"])')
  [ -x "$tests" ] || { echo "!! no test executable for mmembed-candle"; exit 1; }
  rm -rf "$BUNDLE" && mkdir -p "$BUNDLE"
  local tmp
  tmp=$(mktemp -d)
  strip -o "$tmp/mmembed" target/gpu-build/release/mmembed
  strip -o "$tmp/gpu_check" target/gpu-build/release/examples/gpu_check
  strip -o "$tmp/kernel_tests" "$tests"
  printf '{"commit": "%s", "built": "%s", "compute_capability": "9.0", "cuda": "13.0 (PyPI wheels)"}\n' \
    "$(git rev-parse --short HEAD)$(git diff --quiet || echo +changes)" "$(date -u +%FT%TZ)" >"$tmp/build.json"
  tar -C "$tmp" -cJf "$BUNDLE/bin.tar.xz" mmembed gpu_check kernel_tests build.json
  rm -rf "$tmp"
  say "bundle: $(du -h "$BUNDLE/bin.tar.xz" | cut -f1) in $BUNDLE (carry it to the GPU machine)"
}

# end_to_end OUT WORK MODEL DEVICE PRECISIONS: JPEG files through
# `mmembed batch`, and the host's decode ceilings.
end_to_end() {
  local out=$1 work=$2 model=$3 device=$4 precisions=$5
  say "end to end: $E2E_LARGE JPEG files (640x480) through mmembed batch"
  "$PY" scripts/gpu/torch_side.py jpegs "$work/jpegs" "$E2E_LARGE" || failed "making the JPEG files"
  mkdir -p "$work/jpegs-small"
  # A loop, not `ls | head`: with pipefail, ls killed by SIGPIPE once head
  # has its lines (20,000 names overflow the pipe) would stop the script.
  local f k=0
  for f in "$work"/jpegs/*.jpg; do
    [ "$k" -lt "$E2E_SMALL" ] || break
    ln -s "$f" "$work/jpegs-small/"
    k=$((k + 1))
  done
  # The host's ceilings: decode and preprocess on all cores, exact and with
  # --jpeg-draft's reduced decoding, for these photos and for large ones;
  # each JSON line gets the photos' size.
  : >"$out/decode.jsonl"
  ceilings() {
    local dir=$1 size=$2 draft
    for draft in false true; do
      "$BIN/gpu_check" decode "$dir" --model "$model" --seconds "$SECONDS_EACH" --draft $draft \
        | sed "s/}\$/, \"photos\": \"$size\"}/" | tee -a "$out/decode.jsonl" \
        || failed "the decode ceiling on $size photos (draft $draft)"
    done
  }
  ceilings "$work/jpegs" 640x480
  "$PY" scripts/gpu/torch_side.py jpegs "$work/photos-big" "$BIG_PHOTOS" --size "$BIG_SIZE" \
    || failed "making the large JPEG files"
  ceilings "$work/photos-big" "$BIG_SIZE"
  rm -rf "$work/photos-big"
  local prec=${E2E_PRECISION:-${precisions##*,}} small large serial wide draft block fewer
  # Two sizes: their difference is the steady rate, without the model's
  # load and the process start. Then the large set twice more, to say what
  # bounds it: `serial` sends one call at a time (--calls-in-flight 1), so
  # at each call's end the decoders wait for the model's last batch and the
  # GPU for the next call's first (the default keeps a second call queued,
  # prepared while the model finishes the one before); `wide` sends calls
  # of E2E_WIDE_BATCH rows, a quarter of the seams; `draft` decodes with
  # --jpeg-draft (its steady rate is taken against the exact small run, so
  # it understates a little: the small run's decoding was the slower one).
  # `block`: the large run again with MMEMBED_CUDA_SYNC=block (the thread
  # waiting for the GPU sleeps instead of spinning on a core the decoders
  # could use); `fewer`: the large run again with one decoding thread fewer
  # than cores (RAYON_NUM_THREADS), the core left to the model thread and
  # the job's own threads.
  local -A batch_of=([small]=$E2E_BATCH [large]=$E2E_BATCH [serial]=$E2E_BATCH [wide]=$E2E_WIDE_BATCH [draft]=$E2E_BATCH [block]=$E2E_BATCH [fewer]=$E2E_BATCH)
  local -A inflight_of=([small]=2 [large]=2 [serial]=1 [wide]=2 [draft]=2 [block]=2 [fewer]=2)
  local cores fewer_threads
  cores=$(nproc)
  fewer_threads=$(( cores > 1 ? cores - 1 : 1 ))
  local -A threads_of=([small]=$cores [large]=$cores [serial]=$cores [wide]=$cores [draft]=$cores [block]=$cores [fewer]=$fewer_threads)
  for n in small large serial wide draft block fewer; do
    local dir=$work/jpegs batch=${batch_of[$n]} extra=() sync=
    [ $n = small ] && dir=$work/jpegs-small
    [ $n = draft ] && extra=(--jpeg-draft)
    [ $n = block ] && sync=block
    local s e
    s=$(date +%s.%N)
    # The local backend's debug line says where the run's time went (the
    # report quotes each run's last).
    # A time limit per run (seconds at thousands of files a second): a run
    # that hangs costs its own figure, not the report.
    RAYON_NUM_THREADS=${threads_of[$n]} MMEMBED_LOG=info,mmembed_candle=debug MMEMBED_CUDA_SYNC=$sync timeout "$STEP_LIMIT" "$BIN/mmembed" batch "$dir" -o "$work/$n.parquet" --model "$model" --device "$device" \
      --precision "$prec" --batch-size "$batch" --max-batch "$E2E_MAX_BATCH" \
      --calls-in-flight "${inflight_of[$n]}" "${extra[@]}" >"$out/batch_$n.log" 2>&1 \
      || { echo "!! mmembed batch failed:"; tail -20 "$out/batch_$n.log"; }
    e=$(date +%s.%N)
    printf -v "$n" '%s' "$(awk "BEGIN { print $e - $s }")"
  done
  local ceiling exact_ceiling draft_ceiling
  exact_ceiling=$(grep '"decode_preprocess"' "$out/decode.jsonl" | sed -n 's/.*"per_s": *\([0-9.]*\).*/\1/p' | head -1)
  draft_ceiling=$(grep '"decode_preprocess_draft"' "$out/decode.jsonl" | sed -n 's/.*"per_s": *\([0-9.]*\).*/\1/p' | head -1)
  : >"$out/e2e.jsonl"
  for n in large serial wide draft block fewer; do
    local secs=${!n} batch=${batch_of[$n]}
    ceiling=$exact_ceiling
    [ $n = draft ] && ceiling=$draft_ceiling
    printf '{"run": "%s", "precision": "%s", "files_small": %s, "seconds_small": %.2f, "files_large": %s, "seconds_large": %.2f, "steady_images_per_s": %.0f, "decode_ceiling_per_s": %.0f, "batch_size": %s, "calls_in_flight": %s, "max_batch": %s, "cores": %s, "decode_threads": %s}\n' \
      "$n" "$prec" "$E2E_SMALL" "$small" "$E2E_LARGE" "$secs" \
      "$(awk "BEGIN { d = $secs - $small; print (d > 0 ? ($E2E_LARGE - $E2E_SMALL) / d : 0) }")" "${ceiling:-0}" \
      "$batch" "${inflight_of[$n]}" "$E2E_MAX_BATCH" "$cores" "${threads_of[$n]}" | tee -a "$out/e2e.jsonl"
  done
  "$PY" - "$work/large.parquet" "$E2E_LARGE" "$out/batch_large.log" <<'EOF' | tee -a "$out/e2e_rows.txt" || failed "reading the batch's rows"
import sys
try:
    import pyarrow.parquet as pq
except ImportError:
    # The batch job's own count (its last line), when the output cannot be
    # read back here.
    log = [l for l in open(sys.argv[3]) if l.startswith("rows:")]
    sys.exit(print("pyarrow missing, so the Parquet is not read back; mmembed says "
                   + (log[-1].strip() if log else "nothing")))
t = pq.read_table(sys.argv[1])
st = t.column("status").to_pylist()
ok = sum(1 for s in st if not s)
print(f"rows {t.num_rows} of {sys.argv[2]}, ok {ok}, failed {t.num_rows - ok}")
EOF
}

# kernel_tests OUT: mmembed-candle's on_cuda tests from the bundle, each in
# its own process; OUT/kernel_tests.jsonl gets a line per test, OUT/kernel_tests.txt
# their output (the largest differences they measured). A failed kernel's
# environment switch is exported for every later step.
kernel_tests() {
  local out=$1 name rc s
  : >"$out/kernel_tests.jsonl"
  : >"$out/kernel_tests.txt"
  for name in $("$BIN/kernel_tests" --list on_cuda 2>/dev/null | sed -n 's/: test$//p'); do
    s=$(date +%s.%N)
    rc=0
    timeout 120 "$BIN/kernel_tests" --exact "$name" --nocapture --test-threads 1 >"$out/kernel_test.txt" 2>&1 || rc=$?
    cat "$out/kernel_test.txt" >>"$out/kernel_tests.txt"
    # A test that found no GPU passes without checking anything: here that
    # is a failure.
    if [ $rc = 0 ] && grep -q '^skipped: no CUDA' "$out/kernel_test.txt"; then rc=99; fi
    rm -f "$out/kernel_test.txt"
    printf '{"test": "%s", "ok": %s, "rc": %s, "seconds": %.1f}\n' "$name" "$([ $rc = 0 ] && echo true || echo false)" "$rc" \
      "$(awk "BEGIN { print $(date +%s.%N) - $s }")" | tee -a "$out/kernel_tests.jsonl"
    [ $rc = 0 ] && continue
    case $name in
      attention::*)
        echo "!! every further step runs MMEMBED_CUDA_ATTENTION=gemm (our attention kernel failed its test)" | tee -a "$out/fallback.txt"
        export MMEMBED_CUDA_ATTENTION=gemm ;;
      elementwise::*)
        echo "!! every further step runs MMEMBED_CUDA_ELEMENTWISE=candle (one of our elementwise kernels, silu, unfold or token rows, failed its test)" | tee -a "$out/fallback.txt"
        export MMEMBED_CUDA_ELEMENTWISE=candle ;;
      rows::*)
        echo "!! every further step runs MMEMBED_CUDA_GRAPH=cublas (our softmax or layer norm kernel failed its test)" | tee -a "$out/fallback.txt"
        export MMEMBED_CUDA_GRAPH=cublas ;;
    esac
  done
}

# steps OUT DEVICE PRECISIONS: the steps, shared by run, quick and dry-run.
steps() {
  local out=$1 device=$2 precisions=$3
  # Seconds a parity run or a batch job may take before it counts as hung.
  STEP_LIMIT=${STEP_LIMIT:-150}
  local work model inputs t0
  t0=$(date +%s)
  work=$(mktemp -d)
  mkdir -p "$out"
  inputs=$work/inputs
  "$PY" scripts/gpu/torch_side.py inputs "$inputs"
  if [ -n "${MODEL:-}" ]; then
    model=$MODEL
  else
    model=$work/vit-b-32
    say "making the seeded ViT-B/32 with this machine's PyTorch"
    "$PY" scripts/gpu/torch_side.py make "$model"
  fi

  # Our CUDA kernels against their references, one test at a time (a
  # kernel that faults poisons its process's CUDA context, not the next
  # test's): a kernel that fails gives way, for every later step, to the op
  # it replaced, and the report says so.
  if [ "$device" = cuda ] && [ -x "$BIN/kernel_tests" ]; then
    say "our CUDA kernels against their references (mmembed-candle's on_cuda tests)"
    kernel_tests "$out"
  fi

  # Every family's tiny fixture (SigLIP, Chinese-CLIP, MobileCLIP's FastViT
  # and ViT towers: what the seeded ViT-B/32 leaves out) on this device in
  # each precision, against the PyTorch embeddings committed beside it.
  say "every model family's tiny fixture on $device against its committed PyTorch embeddings"
  timeout "$STEP_LIMIT" "$BIN/gpu_check" families models/fixtures --device "$device" --precisions "$precisions" \
    --kernels "${KERNELS:-auto}" | tee "$out/families.jsonl" || failed "a model family's fixture"

  say "parity: PyTorch on $device (the references)"
  local refs=1
  "$PY" scripts/gpu/torch_side.py reference "$model" "$inputs" "$out" --device "$device" --precisions "$precisions" \
    || { failed "PyTorch's references"; refs=0; }
  say "parity: ours on $device per precision, and the cosines"
  # Ours per precision into parity_ours.jsonl, then the cosines to PyTorch;
  # fails if a run erred or (with the references) a cosine missed its goal.
  our_parity() {
    local p ok=0
    : >"$out/parity_ours.jsonl"
    for p in ${precisions//,/ }; do
      timeout "$STEP_LIMIT" "$BIN/gpu_check" parity "$model" "$inputs" "$out/ours_$p.safetensors" --device "$device" --precision "$p" \
        --kernels "${KERNELS:-auto}" \
        | tee -a "$out/parity_ours.jsonl" || { failed "our parity run at $p${MMEMBED_CUDA_GRAPH:+ ($MMEMBED_CUDA_GRAPH graph)}"; ok=1; }
    done
    [ "$refs" = 1 ] || return $ok
    "$PY" scripts/gpu/torch_side.py compare "$inputs" "$out" \
      || { echo "!! parity below the goal${MMEMBED_CUDA_GRAPH:+ ($MMEMBED_CUDA_GRAPH graph)}: see $out/parity.jsonl"; ok=1; }
    return $ok
  }
  if [ "$device" = cuda ] && [ "${KERNELS:-auto}" = auto ]; then
    # Our default CUDA graph; if it errs or misses parity on this machine,
    # the graph before it (candle's softmax and layer norm), then candle's
    # own ops: every later step runs on the first graph that is right, so
    # one run still gives every other figure.
    # First, if only our kernel for the crops' bytes is off (parity's
    # u8_pixels check), candle's ops for that alone on our graph.
    # Then, before leaving our graph, its attention kernel and its
    # elementwise ones (silu, the patches' unfolding, the text rows), one
    # at a time (if their tests above did not already).
    local graph
    for graph in "" pixels attention elementwise cublas portable; do
      if [ "$graph" = pixels ]; then
        grep -q '"check":"u8_pixels","differ":[1-9]' "$out/parity_ours.jsonl" || continue
        echo "!! every further step runs MMEMBED_CUDA_PIXELS=candle (our kernel's floats differ from the host's)" | tee -a "$out/fallback.txt"
        export MMEMBED_CUDA_PIXELS=candle
      elif [ "$graph" = attention ]; then
        [ "${MMEMBED_CUDA_ATTENTION:-}" != gemm ] || continue
        echo "!! every further step runs MMEMBED_CUDA_ATTENTION=gemm (parity failed with our attention kernel)" | tee -a "$out/fallback.txt"
        export MMEMBED_CUDA_ATTENTION=gemm
      elif [ "$graph" = elementwise ]; then
        [ "${MMEMBED_CUDA_ELEMENTWISE:-}" != candle ] || continue
        echo "!! every further step runs MMEMBED_CUDA_ELEMENTWISE=candle (parity failed with our elementwise kernels: silu, unfold, token rows)" | tee -a "$out/fallback.txt"
        export MMEMBED_CUDA_ELEMENTWISE=candle
      elif [ -n "$graph" ]; then
        echo "!! every further step runs MMEMBED_CUDA_GRAPH=$graph (the graph above failed)" | tee -a "$out/fallback.txt"
        export MMEMBED_CUDA_GRAPH=$graph
      fi
      our_parity && break
    done
  else
    our_parity || true
  fi

  say "throughput: ours"
  "$BIN/gpu_check" speed "$model" --device "$device" --precisions "$precisions" \
    --images "$IMAGES" --texts "$TEXTS" --seconds "$SECONDS_EACH" --kernels "${KERNELS:-auto}" \
    | tee "$out/speed_ours.jsonl" \
    || failed "our throughput run"
  # The same model on the graphs before ours, model only: with candle's
  # softmax and layer norm (MMEMBED_CUDA_GRAPH=cublas), and on candle's own
  # ops throughout (portable, the first run's graph): what each step of
  # ours is worth, measured beside the rest.
  local other
  for other in cublas portable; do
    say "throughput: ours on the $other graph, model only"
    "$BIN/gpu_check" speed "$model" --device "$device" --precisions "${precisions##*,}" \
      --images "$GRAPHS_IMAGES" --texts "$GRAPHS_TEXTS" --seconds "$SECONDS_EACH" --kernels "$other" --host false \
      | tee -a "$out/speed_ours.jsonl" \
      || failed "our throughput run on the $other graph"
  done
  # And our graph with one of its kernels swapped back for the op before
  # it (attention by cuBLAS GEMMs; candle's silu, unfolding and text rows), model
  # only, bf16: what that kernel is worth. Skipped where a fallback already
  # swapped it.
  local variant
  for variant in MMEMBED_CUDA_ATTENTION=gemm:mmembed-gemm-attention MMEMBED_CUDA_ELEMENTWISE=candle:mmembed-candle-elementwise; do
    local setting=${variant%%:*} name=${variant#*:}
    [ "$(printenv "${setting%%=*}" || true)" != "${setting#*=}" ] && [ -z "${MMEMBED_CUDA_GRAPH:-}" ] || continue
    say "throughput: ours with $setting, model only"
    env "$setting" "$BIN/gpu_check" speed "$model" --device "$device" --precisions "${precisions##*,}" \
      --images "$VARIANT_IMAGES" --texts "$GRAPHS_TEXTS" --seconds "$SECONDS_EACH" --kernels "${KERNELS:-auto}" \
      --host false --stack "$name" | tee -a "$out/speed_ours.jsonl" \
      || failed "our throughput run with $setting"
  done
  say "throughput: PyTorch eager"
  "$PY" scripts/gpu/torch_side.py speed "$model" --device "$device" --precisions "$precisions" \
    --images "$IMAGES" --texts "$TEXTS" --seconds "$SECONDS_EACH" | tee "$out/speed_torch.jsonl" \
    || failed "PyTorch's throughput run"

  [ -n "${QUICK:-}" ] || end_to_end "$out" "$work" "$model" "$device" "$precisions"
  # A report before the profiles too: a run stopped by its time limit
  # during them still leaves one.
  "$PY" scripts/gpu/torch_side.py report "$out" >/dev/null || failed "the report"

  # Where our bf16 image forward spends its GPU time, kernel by kernel
  # (about 400 kernels, one forward at batch 256, each replayed by Nsight
  # Compute; a minute or two), when the machine has it and time allows.
  local ncu=${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}
  if [ "$device" = cuda ] && [ -x "$ncu" ] && [ $(( $(date +%s) - t0 )) -lt "$NCU_IF_UNDER" ]; then
    say "Nsight Compute: kernel times of our bf16 image forward, batch 256"
    timeout 100 "$ncu" --launch-skip 600 --launch-count 400 --metrics gpu__time_duration.sum --csv \
      "$BIN/gpu_check" speed "$model" --device cuda --precisions bf16 --images 256 --texts "" \
      --seconds 0.2 --host false >"$out/ncu.csv" 2>&1 || failed "Nsight Compute"
  fi
  # The same for the text forward (77 tokens, batch 256: 0.18x PyTorch in
  # the first run, the furthest from its goal), when time still allows.
  if [ "$device" = cuda ] && [ -x "$ncu" ] && [ $(( $(date +%s) - t0 )) -lt "$NCU_TEXTS_IF_UNDER" ]; then
    say "Nsight Compute: kernel times of our bf16 text forward, batch 256"
    timeout 80 "$ncu" --launch-skip 600 --launch-count 400 --metrics gpu__time_duration.sum --csv \
      "$BIN/gpu_check" speed "$model" --device cuda --precisions bf16 --images "" --texts 256 \
      --seconds 0.2 --host false >"$out/ncu_texts.csv" 2>&1 || failed "Nsight Compute (texts)"
  fi
  # The report now, and again after torch.compile: a run stopped by its
  # time limit during the compilation still leaves one.
  "$PY" scripts/gpu/torch_side.py report "$out" >/dev/null || failed "the report"
  if [ -n "$COMPILE" ] && [ $(( $(date +%s) - t0 )) -lt "$COMPILE_IF_UNDER" ]; then
    say "throughput: PyTorch torch.compile $COMPILE (time allows)"
    "$PY" scripts/gpu/torch_side.py speed "$model" --device "$device" --precisions "" --compile "$COMPILE" \
      --images "$COMPILE_IMAGES" --texts "$COMPILE_TEXTS" --seconds "$SECONDS_EACH" | tee -a "$out/speed_torch.jsonl" \
      || echo "!! torch.compile failed (eager figures stand)"
  fi
  "$PY" scripts/gpu/torch_side.py report "$out" >/dev/null || failed "the report"
  say "done in $(( $(date +%s) - t0 )) s: $out/report.md"
  rm -rf "$work"
}

env_json() {
  local out=$1
  mkdir -p "$out"
  "$PY" - "$out/env.json" "${BUILD_JSON:-}" <<'EOF'
import json, os, subprocess, sys
env = {}
try:
    import torch
    env["torch"] = torch.__version__
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["compute capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
except Exception as e:  # noqa: BLE001
    env["torch"] = f"unavailable: {e}"
try:
    env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=20).stdout.strip()
except Exception:  # noqa: BLE001
    pass
env["cpu cores"] = os.cpu_count()
# The decode ceiling depends on the cores' vectors (the resampling passes
# are compiled for AVX-512 and AVX2; libjpeg-turbo picks its own SIMD).
try:
    lines = open("/proc/cpuinfo").read().splitlines()
    model = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")), None)
    flags = next((l.split(":", 1)[1].split() for l in lines if l.startswith("flags")), [])
    if model:
        env["cpu"] = model
    env["cpu vectors"] = " ".join(f for f in ("avx2", "avx512f", "avx512bw", "avx512_vnni", "amx_bf16")
                                  if f in flags) or "no AVX2"
except OSError:
    pass
if len(sys.argv) > 2 and sys.argv[2] and os.path.exists(sys.argv[2]):
    env["build"] = json.load(open(sys.argv[2]))
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env))
EOF
}

run() {
  local out=${1:?usage: scripts/gpu-check.sh run OUT}
  unpack "$out"
  IMAGES=1,32,256,1024 TEXTS=32,256 SECONDS_EACH=${SECONDS_EACH:-2}
  GRAPHS_IMAGES=1,256,1024 GRAPHS_TEXTS=256 VARIANT_IMAGES=256,1024
  E2E_SMALL=2000 E2E_LARGE=${E2E_LARGE:-20000} E2E_BATCH=1024 E2E_WIDE_BATCH=4096 E2E_MAX_BATCH=256
  BIG_PHOTOS=160 BIG_SIZE=4000x3000
  COMPILE=bf16 COMPILE_IMAGES=256,1024 COMPILE_TEXTS=256 COMPILE_IF_UNDER=${COMPILE_IF_UNDER:-360}
  NCU_IF_UNDER=${NCU_IF_UNDER:-400} NCU_TEXTS_IF_UNDER=${NCU_TEXTS_IF_UNDER:-450}
  steps "$out" cuda f32,f16,bf16
}

# The bundle unpacked into $BIN, this machine's CUDA libraries on the
# loader's path, the environment into OUT/env.json.
unpack() {
  local out=$1
  PY=${MMEMBED_GPU_PYTHON:-python3}
  [ -f "$BUNDLE/bin.tar.xz" ] || { echo "no $BUNDLE/bin.tar.xz: run 'scripts/gpu-check.sh build' first and carry $BUNDLE"; exit 1; }
  BIN=$(mktemp -d)
  # Python's tarfile: the machine may have no xz.
  "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$BUNDLE/bin.tar.xz" "$BIN"
  chmod +x "$BIN/mmembed" "$BIN/gpu_check"
  [ ! -f "$BIN/kernel_tests" ] || chmod +x "$BIN/kernel_tests"
  BUILD_JSON=$BIN/build.json
  # The CUDA libraries of this machine's PyTorch wheels (cuBLAS, cuRAND,
  # NVRTC); the driver's libcuda.so.1 is on the loader's path already.
  local libs
  libs=$("$PY" -c 'import glob, os, nvidia; print(":".join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(os.path.join(d, "**", "lib*.so*"), recursive=True)})))')
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  if ldd "$BIN/mmembed" | grep -q "not found"; then
    echo "!! libraries missing for the binary:"; ldd "$BIN/mmembed" | grep "not found"; exit 1
  fi
  env_json "$out"
}

# A second look after a change, in about two minutes: bf16 parity, model-only
# throughput of ours (every graph) and PyTorch eager at the batches of the
# goal, and the Nsight Compute table; no end-to-end run, no torch.compile.
quick() {
  local out=${1:?usage: scripts/gpu-check.sh quick OUT}
  unpack "$out"
  IMAGES=256,1024 TEXTS=256 SECONDS_EACH=${SECONDS_EACH:-2}
  GRAPHS_IMAGES=256,1024 GRAPHS_TEXTS="" VARIANT_IMAGES=256,1024
  QUICK=1 COMPILE="" COMPILE_IF_UNDER=0 NCU_IF_UNDER=${NCU_IF_UNDER:-600} NCU_TEXTS_IF_UNDER=${NCU_TEXTS_IF_UNDER:-600}
  steps "$out" cuda bf16
}

dry_run() {
  local out=${1:?usage: scripts/gpu-check.sh dry-run OUT}
  PY=${MMEMBED_GPU_PYTHON:-python3}
  say "building the CPU binaries (debug)"
  cargo build --locked -p mmembed-cli --bin mmembed -p mmembed-candle --example gpu_check
  BIN=$(mktemp -d)
  ln -s "$PWD/target/debug/mmembed" "$PWD/target/debug/examples/gpu_check" "$BIN/"
  env_json "$out"
  MODEL=$PWD/models/fixtures/tiny-clip
  IMAGES=1,8 TEXTS=8 SECONDS_EACH=0.2 GRAPHS_IMAGES=8 GRAPHS_TEXTS=8 VARIANT_IMAGES=8
  E2E_SMALL=20 E2E_LARGE=100 E2E_BATCH=32 E2E_WIDE_BATCH=96 E2E_MAX_BATCH=8
  BIG_PHOTOS=4 BIG_SIZE=1600x1200
  COMPILE="" COMPILE_IF_UNDER=0 NCU_IF_UNDER=0 NCU_TEXTS_IF_UNDER=0
  # Parity and model-only speed through the CUDA graph (Kernels::Cuda, its
  # cuBLAS calls and row kernels through their CPU references) in every
  # precision, run on the CPU; the batch job (which picks its own kernels,
  # and on the CPU only f32) in f32.
  KERNELS=cuda E2E_PRECISION=f32
  steps "$out" cpu f32,f16,bf16
}

case "${1:-}" in
  build) build ;;
  run) shift; run "$@" ;;
  quick) shift; quick "$@" ;;
  dry-run) shift; dry_run "$@" ;;
  *) sed -n "2,/^set -euo/{/^set/!p}" "$0"; exit 2 ;;
esac
