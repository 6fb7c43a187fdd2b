#!/usr/bin/env python3
"""SigLIP 2 NaFlex's image tower on the CPU: ours against PyTorch eager
(transformers' Siglip2Model) and ONNX Runtime (fp32, int8), on the same seeded
full-size weights, in paired rounds on the same threads.

    cargo build --release --example clip_loop --features local
    cargo build --release -p mmembed-cli
    python scripts/naflex_bench.py                      # base patch16, 256 patches, 2 threads
    python scripts/naflex_bench.py --batches 1,32 --rounds 3 --seconds 20

Needs torch, transformers and safetensors from PyPI (and, for the ONNX
Runtime columns, onnxruntime and onnx). The checkpoint is
google/siglip2-base-patch16-naflex's architecture (transformers' defaults:
width 768, 12 layers, patches of 16, a 16 x 16 grid of positions) with
transformers' random init under a fixed seed (speed does not depend on
the values), written once in Hugging Face's format with the fixture's
Gemma-style tokenizer, so `clip_loop` loads it as it would a hub
repository. Every image is a square of the whole budget (16 x 16 = 256
patches), as a photo fills it; PyTorch gets the padded, masked input its
processor makes (no padding here: every patch is real). ONNX Runtime runs
PyTorch's export (TorchScript exporter, opset 18; the dynamo exporter
cannot translate transformers' mask checks) of that call for the one grid
of 16 x 16 patches, a batch of any size, in fp32 and quantised
(`quantize_dynamic`, int8 weights): the position grid's resize is then a
constant it folds, where ours and PyTorch's redo it per call. First each
int8 stack's accuracy: the fixture photos squashed to 256 x 256 (the
grid the export takes), ours through `mmembed embed` (so build the CLI
too: cargo build --release -p mmembed-cli), cosine to PyTorch fp32. Then
each round times ours (`clip_loop`, f32 then int8, a subprocess: its
mean over the round), PyTorch and ONNX Runtime fp32 and int8; the table
gives each stack's median over the rounds and the median of our
per-round ratios. Figures and machine: BENCHMARKS.md.
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


def pixels(batch: int):
    """`batch` images of the whole budget as the processor makes them:
    256 patches of 16 x 16 x 3 values, none padding."""
    import torch

    n = 256
    return (torch.arange(batch * n * 768) % 251).float().reshape(batch, n, 768) / 127.5 - 1


def features(m, px):
    import torch

    batch = px.shape[0]
    mask = torch.ones(batch, 256, dtype=torch.long)
    shapes = torch.tensor([[16, 16]]).expand(batch, 2)
    out = m.get_image_features(pixel_values=px, pixel_attention_mask=mask, spatial_shapes=shapes)
    # (transformers 5 returns an output object, 4 the tensor)
    return getattr(out, "pooler_output", out)


def torch_rate(m, batch: int, seconds: float) -> float:
    import torch

    px = pixels(batch)
    with torch.inference_mode():
        return rate(lambda: features(m, px), batch, seconds)


def ort_sessions(m, threads: int) -> dict:
    """ONNX Runtime on PyTorch's export of the image call: fp32 and dynamic
    int8 (`quantize_dynamic`, int8 weights, as bench_pytorch.py makes it
    for the other families); empty without onnxruntime."""
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as e:
        print(f"ONNX Runtime columns skipped ({e})", flush=True)
        return {}
    import tempfile

    import numpy as np
    import torch

    class Image(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, px):
            return features(self.m, px)

    work = tempfile.TemporaryDirectory(prefix="mmembed-naflex-ort-")
    fp32, int8 = (str(Path(work.name) / f) for f in ("image.onnx", "image.int8.onnx"))
    px = pixels(2)
    torch.onnx.export(Image(m), (px,), fp32, input_names=["x"], output_names=["e"],
                      dynamic_axes={"x": {0: "b"}, "e": {0: "b"}}, opset_version=18, dynamo=False)
    quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sessions = {prec: ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
                for prec, path in (("fp32", fp32), ("int8", int8))}
    work.cleanup()
    with torch.inference_mode():
        want = features(m, px).numpy()
    got = sessions["fp32"].run(None, {"x": px.numpy()})[0]
    # The export must compute what PyTorch does, or its speed means nothing.
    if not np.allclose(got, want, atol=1e-4):
        raise SystemExit(f"ONNX export differs from PyTorch by {np.abs(got - want).max()}")
    print(f"ONNX Runtime {ort.__version__}: export matches PyTorch to {np.abs(got - want).max():.1e}",
          flush=True)
    return sessions


def ort_rate(session, batch: int, seconds: float) -> float:
    x = pixels(batch).numpy()
    return rate(lambda: session.run(None, {"x": x}), batch, seconds)


def accuracy(m, model: Path, sessions: dict) -> None:
    """Each int8 stack against PyTorch fp32 on the fixture photos, each
    squashed to 256 x 256 pixels so that it fills the one grid the ONNX
    export takes: mean and min cosine, ours through `mmembed embed`."""
    import subprocess
    import tempfile

    import numpy as np
    import torch
    from PIL import Image
    from transformers import Siglip2ImageProcessor

    mmembed = ROOT / "target" / "release" / "mmembed"
    if not mmembed.exists():
        print(f"accuracy skipped: {mmembed} is missing (cargo build --release -p mmembed-cli)")
        return
    photos = sorted(p for p in (ROOT / "models" / "fixtures" / "images").iterdir()
                    if p.suffix in (".png", ".jpg"))
    work = tempfile.TemporaryDirectory(prefix="mmembed-naflex-photos-")
    files = []
    for p in photos:
        f = Path(work.name) / f"{p.stem}.png"
        Image.open(p).convert("RGB").resize((256, 256), Image.BILINEAR).save(f)
        files.append(f)
    proc = Siglip2ImageProcessor.from_pretrained(str(model))
    batch = proc(images=[Image.open(f) for f in files], return_tensors="pt")
    assert batch["spatial_shapes"].tolist() == [[16, 16]] * len(files)
    with torch.inference_mode():
        truth = features(m, batch["pixel_values"]).numpy()

    def unit(v):
        v = np.asarray(v, dtype=np.float64)
        return v / np.linalg.norm(v, axis=-1, keepdims=True)

    def ours(precision: str):
        out = subprocess.run([str(mmembed), "embed", "--model", str(model), "--device", "cpu",
                              "--precision", precision, *map(str, files)],
                             check=True, capture_output=True, text=True).stdout
        return [json.loads(line)["embedding"] for line in out.splitlines()]

    stacks = {"ours f32": ours("f32"), "ours int8": ours("int8")}
    x = batch["pixel_values"].numpy()
    for prec, session in sessions.items():
        stacks[f"ort {prec}"] = session.run(None, {"x": x})[0]
    for name, v in stacks.items():
        cos = (unit(v) * unit(truth)).sum(-1)
        print(f"accuracy, {name} vs PyTorch fp32 on {len(files)} photos: "
              f"mean {cos.mean():.6f}, min {cos.min():.6f}", flush=True)
    work.cleanup()


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
    sessions = ort_sessions(m, args.threads)
    accuracy(m, args.model, sessions)
    head = ["f32", "int8", "torch", "ort fp32", "ort int8"]
    print("| batch | " + " | ".join(f"{h}/s" for h in head)
          + " | f32/pt | int8/pt | f32/ort fp32 | int8/ort int8 |\n|" + "---|" * 10)
    for batch in (int(b) for b in args.batches.split(",")):
        rows = []
        for r in range(args.rounds):
            run = lambda precision: ours(  # noqa: E731
                CLIP_LOOP, args.model, "images", batch, args.seconds, args.threads, precision)
            row = [run("f32"), run("int8"), torch_rate(m, batch, args.seconds)]
            row += [ort_rate(sessions[p], batch, args.seconds) if p in sessions else float("nan")
                    for p in ("fp32", "int8")]
            print(f"  round {r + 1}, batch {batch}: "
                  + ", ".join(f"{h} {v:.2f}/s" for h, v in zip(head, row)), flush=True)
            rows.append(row)
        med = [statistics.median(x) for x in zip(*rows)]
        # Our ratio per round, then the median (see mobileclip_bench.py).
        ratios = [statistics.median(r[k] / r[d] for r in rows) for k, d in ((0, 2), (1, 2), (0, 3), (1, 4))]
        print(f"| {batch} | " + " | ".join(f"{x:.2f}" for x in med) + " | "
              + " | ".join(f"{x:.2f}x" for x in ratios) + " |", flush=True)

if __name__ == "__main__":
    main()
