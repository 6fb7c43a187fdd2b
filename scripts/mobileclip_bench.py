#!/usr/bin/env python3
"""MobileCLIP on the CPU: ours against PyTorch (open_clip, eager and
reparameterised) and ONNX Runtime fp32, on the same seeded full-size weights,
in paired rounds on the same threads.

    cargo build --release --example clip_loop --features local
    python scripts/mobileclip_bench.py                     # MobileCLIP-S1, 2 threads
    python scripts/mobileclip_bench.py --model MobileCLIP-S2 --threads 4
    python scripts/mobileclip_bench.py --model MobileCLIP-B --batches 1,8 --rounds 1

Needs torch, open_clip_torch, timm, safetensors and (for the ONNX Runtime
column) onnxruntime and onnx from PyPI. The checkpoint is open_clip's
architecture with its own random init (seed 0; speed does not depend on the
values), written once in open_clip's format with the CLIP tokenizer of the
fixtures, so `clip_loop` loads it as it would a hub repository. Each round
times ours (`clip_loop`, a subprocess: the figure is its mean over the
round), then PyTorch eager, PyTorch after timm's `reparameterize_model`
(what an inference user runs), then ONNX Runtime on the reparameterised
image tower exported with opset 17; the table gives each stack's median
over the rounds and the median of our per-round ratios to it (more rounds
of fewer seconds make those steadier on a noisy host). Figures and
machine: BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_checkpoint(out: Path, name: str) -> None:
    import open_clip
    import torch
    from safetensors.torch import save_file

    if (out / "open_clip_model.safetensors").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None).eval()
    cfg = open_clip.get_model_config(name)
    pre = open_clip.get_pretrained_cfg(name, open_clip.list_pretrained_tags_by_model(name)[0])
    preprocess = {k: pre[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in pre}
    (out / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(out / "open_clip_model.safetensors"))
    (out / "tokenizer.json").write_bytes(
        (ROOT / "models/fixtures/tiny-clip/tokenizer.json").read_bytes())
    print(f"wrote a seeded {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters) to {out}", flush=True)


def rate(fn, batch: int, seconds: float) -> float:
    fn()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds or n < 3:
        fn()
        n += 1
    return n * batch / (time.perf_counter() - start)


def ours(clip_loop: Path, model: Path, workload: str, batch: int, seconds: float,
         threads: int, precision: str) -> float:
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    out = subprocess.run([str(clip_loop), str(model), workload, str(batch), str(seconds), precision],
                         env=env, check=True, capture_output=True, text=True).stdout
    return float(re.search(r"([\d.]+) items/s;", out).group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="MobileCLIP-S1", help="open_clip model name")
    ap.add_argument("--dir", type=Path, help="checkpoint directory (default: a temp dir per model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=6.0, help="per stack, per workload, per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default="1,8,32", help="image batch sizes, comma-separated")
    ap.add_argument("--clip-loop", type=Path, default=ROOT / "target/release/examples/clip_loop")
    args = ap.parse_args()

    import open_clip
    import timm
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    model_dir = args.dir or Path(tempfile.gettempdir()) / f"mmembed-bench-{args.model}"
    make_checkpoint(model_dir, args.model)
    if not args.clip_loop.exists():
        raise SystemExit(f"{args.clip_loop} is missing: cargo build --release --example clip_loop "
                         "--features local")
    model = open_clip.create_model(args.model, pretrained=None).eval()
    model.load_state_dict(load_file(str(model_dir / "open_clip_model.safetensors")))
    fused = timm.utils.reparameterize_model(model)
    size = model.visual.image_size[0]
    # A ViT tower (MobileCLIP-B, MobileCLIP 2 L-14) has no branches to fold,
    # and is one of our transformers: int8 applies to it too.
    fastvit = model.visual.trunk.__class__.__name__ == "FastVit"

    ort_session = None
    try:
        import numpy as np
        import onnxruntime as ort

        class Image(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, x):
                return self.m.encode_image(x)

        path = str(Path(tempfile.mkdtemp()) / "image.onnx")
        torch.onnx.export(Image(fused), (torch.rand(1, 3, size, size),), path, input_names=["x"],
                          output_names=["e"], dynamic_axes={"x": {0: "b"}, "e": {0: "b"}},
                          opset_version=17, dynamo=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        ort_session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        ort_version = ort.__version__
    except ImportError as e:
        print(f"ONNX Runtime column skipped ({e})")

    workloads = [*(("images", int(b)) for b in args.batches.split(",")), ("texts77", 32)]
    results: dict[tuple, list[float]] = {}
    for r in range(args.rounds):
        for workload, batch in workloads:
            key = lambda stack: (workload, batch, stack)  # noqa: E731
            for precision in ("f32", "int8") if workload == "texts77" or not fastvit else ("f32",):
                results.setdefault(key(f"ours {precision}"), []).append(
                    ours(args.clip_loop, model_dir, workload, batch, args.seconds, args.threads, precision))
            with torch.inference_mode():
                if workload == "images":
                    x = torch.rand(batch, 3, size, size)
                    stacks = (("pytorch eager", model), ("pytorch reparameterised", fused))
                    for stack, m in stacks if fastvit else stacks[:1]:
                        results.setdefault(key(stack), []).append(
                            rate(lambda: m.encode_image(x), batch, args.seconds))
                    if ort_session is not None:
                        xn = x.numpy()
                        results.setdefault(key(f"ort {ort_version} fp32"), []).append(
                            rate(lambda: ort_session.run(None, {"x": xn}), batch, args.seconds))
                else:
                    ids = torch.randint(1, 49000, (batch, 77))
                    results.setdefault(key("pytorch eager"), []).append(
                        rate(lambda: model.encode_text(ids), batch, args.seconds))
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    print(f"\n{args.model}, {args.threads} threads, torch {torch.__version__}, open_clip "
          f"{open_clip.__version__}, timm {timm.__version__}; items/s, median of {args.rounds} rounds")
    for workload, batch in workloads:
        runs = {s: v for (w, b, s), v in results.items() if (w, b) == (workload, batch)}
        ours_f32 = runs["ours f32"]

        # Our ratio per round, then the median: stacks timed seconds apart
        # in one round share the host's state, and this host's speed drifts
        # by 20 % over minutes, which a ratio of medians would carry.
        def ratio(v: list[float]) -> float:
            return statistics.median(a / b for a, b in zip(ours_f32, v))

        line = ", ".join(f"{s} {statistics.median(v):.2f}"
                         + ("" if s.startswith("ours") else f" (ours {ratio(v):.2f}x)")
                         for s, v in runs.items())
        print(f"{workload} x{batch}: {line}")


if __name__ == "__main__":
    main()
