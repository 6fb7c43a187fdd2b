#!/usr/bin/env python3
"""SigLIP 2 NaFlex's image tower on the CPU: ours against PyTorch eager
(transformers' Siglip2Model), on the same seeded full-size weights, in
paired rounds on the same threads.

    cargo build --release --example clip_loop --features local
    python scripts/naflex_bench.py                      # base patch16, 256 patches, 2 threads
    python scripts/naflex_bench.py --batches 1,32 --rounds 3 --seconds 20

Needs torch, transformers and safetensors from PyPI. The checkpoint is
google/siglip2-base-patch16-naflex's architecture (transformers' defaults:
width 768, 12 layers, patches of 16, a 16 x 16 grid of positions) with
transformers' random init under a fixed seed (speed does not depend on
the values), written once in Hugging Face's format with the fixture's
Gemma-style tokenizer, so `clip_loop` loads it as it would a hub
repository. Every image is a square of the whole budget (16 x 16 = 256
patches), as a photo fills it; PyTorch gets the padded, masked input its
processor makes (no padding here: every patch is real). Each round times
ours (`clip_loop`, f32 then int8, a subprocess: its mean over the round)
and PyTorch; the table gives each stack's median over the rounds and the
median of our per-round ratios. Figures and machine: BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

# The timing helpers (run from scripts/, which Python puts on the path).
from mobileclip_bench import ours, rate

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "models" / "fixtures" / "tiny-siglip2-naflex"
CLIP_LOOP = ROOT / "target" / "release" / "examples" / "clip_loop"


def build(out: Path) -> None:
    import torch
    from transformers import Siglip2Config, Siglip2Model

    out.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        (out / f).write_bytes((FIXTURE / f).read_bytes())
    pre = json.loads((FIXTURE / "preprocessor_config.json").read_text())
    pre |= {"max_num_patches": 256, "patch_size": 16}
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    vocab = len(json.loads((FIXTURE / "tokenizer.json").read_text())["model"]["vocab"])
    torch.manual_seed(0)
    config = Siglip2Config(
        text_config=dict(vocab_size=vocab, pad_token_id=0, eos_token_id=1, bos_token_id=2),
        vision_config=dict(),
    )
    Siglip2Model(config).eval().save_pretrained(str(out), safe_serialization=True)


def torch_rate(m, batch: int, seconds: float) -> float:
    import torch

    n = 256
    px = (torch.arange(batch * n * 768) % 251).float().reshape(batch, n, 768) / 127.5 - 1
    mask = torch.ones(batch, n, dtype=torch.long)
    shapes = torch.tensor([[16, 16]] * batch)
    with torch.inference_mode():
        return rate(lambda: m.get_image_features(
            pixel_values=px, pixel_attention_mask=mask, spatial_shapes=shapes), batch, seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("/tmp/siglip2-base-naflex"))
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not (args.model / "model.safetensors").exists():
        print(f"writing the seeded checkpoint to {args.model}", flush=True)
        build(args.model)
    import torch
    from transformers import Siglip2Model

    torch.set_num_threads(args.threads)
    m = Siglip2Model.from_pretrained(str(args.model), dtype=torch.float32).eval()
    print("| batch | f32/s | int8/s | torch/s | f32/pt | int8/pt |\n|---|---|---|---|---|---|")
    for batch in (int(b) for b in args.batches.split(",")):
        rows = []
        for r in range(args.rounds):
            run = lambda precision: ours(  # noqa: E731
                CLIP_LOOP, args.model, "images", batch, args.seconds, args.threads, precision)
            f, i = run("f32"), run("int8")
            t = torch_rate(m, batch, args.seconds)
            print(f"  round {r + 1}, batch {batch}: ours f32 {f:.2f}/s, int8 {i:.2f}/s, torch {t:.2f}/s",
                  flush=True)
            rows.append((f, i, t))
        med = [statistics.median(x) for x in zip(*rows)]
        ratios = [statistics.median(r[k] / r[2] for r in rows) for k in (0, 1)]
        print(f"| {batch} | {med[0]:.2f} | {med[1]:.2f} | {med[2]:.2f} | {ratios[0]:.2f}x | {ratios[1]:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
