#!/usr/bin/env python3
"""What 8-bit activations would cost the int8 path, simulated in PyTorch.

    python3 scripts/w8a8_accuracy.py [MODEL_DIR]     (default /tmp/vit-b-32)

Makes the seeded ViT-B/32 of `scripts/gpu/torch_side.py make` if MODEL_DIR
has none, runs it on the committed parity inputs (22 texts, 7 photos) with
every `nn.Linear` computed on int8 weights (one scale per output channel,
as `QLinear` quantises them) and activations rounded per row by one of
these schemes, and prints each scheme's cosine to the fp32 model:

- 16 bits: what `QLinear` does (as many bits as the 32-bit sums allow for
  the row's length: 13 at 3,072, 15 at 768), symmetric;
- u8: unsigned 8 bits with a zero point per row (`W8A8Linear`);
- s8: symmetric 8 bits per row.

and which layers get 8 bits. It also prints, per layer kind, the range of
each normed row over its root mean square, the statistic `W8A8Linear`
checks before it uses 8 bits (`MAX_RANGE_OVER_RMS`).

Needs torch, transformers and safetensors (the bench venv of BENCHMARKS.md).
This was the first evidence behind the choice in
`crates/mmembed-candle/src/w8a8.rs`; the choice now rests on the Rust
path's own figures (`gpu_check parity --device cpu`, the parity tests'
fixtures; BENCHMARKS.md, "Step 4"), which put 8 bits on every layer but
attention's output projection.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts" / "gpu"))
import torch_side  # noqa: E402


def quantised_weight(w: torch.Tensor) -> torch.Tensor:
    s = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
    return (w / s).round().clamp(-127, 127) * s


def act16(x: torch.Tensor) -> torch.Tensor:
    k = x.shape[-1]
    qmax = min(2**31 // (2 * 127 * ((k + 1) // 2)), 32767)
    s = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / qmax
    return (x / s).round() * s


def act_u8(x: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = x.amax(dim=-1, keepdim=True).clamp(min=0)
    s = (hi - lo).clamp_min(1e-12) / 255
    zp = (-lo / s).round()
    return ((x / s).round() + zp).clamp(0, 255).sub(zp) * s


def act_s8(x: torch.Tensor) -> torch.Tensor:
    s = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127
    return (x / s).round() * s


def main() -> None:
    torch.set_num_threads(1)
    model_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/vit-b-32")
    if not (model_dir / "model.safetensors").exists():
        torch_side.make(model_dir)
    inputs = model_dir / "parity-inputs"
    if not (inputs / "inputs.json").exists():
        torch_side.inputs(inputs)
    meta = json.loads((inputs / "inputs.json").read_text())
    seqs = [t["ids"] for t in meta["texts"]]
    n = max(map(len, seqs))
    ids = torch.tensor([s + [49407] * (n - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs])
    px = load_file(str(inputs / "pixels.safetensors"))["pixel_values"]
    model = torch_side.load_model(model_dir, torch.float32, "cpu")

    linears = {m: name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    scheme: dict[torch.nn.Linear, object] = {}
    plain = torch.nn.Linear.forward

    def forward(self, x):
        if self not in scheme:
            return plain(self, x)
        return torch.nn.functional.linear(scheme[self](x), self.qw, self.bias)

    torch.nn.Linear.forward = forward
    for m in linears:
        m.qw = quantised_weight(m.weight.data)

    @torch.inference_mode()
    def embed():
        t = torch_side.features(model.get_text_features(input_ids=ids, attention_mask=mask))
        i = torch_side.features(model.get_image_features(pixel_values=px))
        return torch.nn.functional.normalize(t, dim=-1), torch.nn.functional.normalize(i, dim=-1)

    t0, i0 = embed()

    def run(label, pick) -> None:
        scheme.clear()
        for m, name in linears.items():
            if (a := pick(name)) is not None:
                scheme[m] = a
        t, i = embed()
        ct, ci = (t * t0).sum(-1), (i * i0).sum(-1)
        print(f"{label:38s} texts mean {ct.mean():.6f} min {ct.min():.6f}   "
              f"images mean {ci.mean():.6f} min {ci.min():.6f}")

    encoder = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    normed = ("q_proj", "k_proj", "v_proj", "fc1")
    print("int8 weights; activations per row as named; cosine to fp32")
    run("16 bits everywhere (QLinear)", lambda n: act16)
    run("u8 on q/k/v + fc1, 16 bits elsewhere", lambda n: act_u8 if n.endswith(normed) else act16)
    run("u8 on the encoder, 16 bits elsewhere", lambda n: act_u8 if n.endswith(encoder) else act16)
    run("u8 everywhere", lambda n: act_u8)
    run("s8 everywhere", lambda n: act_s8)

    scheme.clear()
    ratios: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for m, name in linears.items():
        if name.endswith(("q_proj", "out_proj", "fc1", "fc2")):
            key = ("text " if "text" in name else "vision ") + name.rsplit(".", 1)[-1]

            def hook(_mod, inp, _out, key=key):
                x = inp[0].reshape(-1, inp[0].shape[-1])
                r = (x.amax(-1).clamp(min=0) - x.amin(-1).clamp(max=0)) / x.pow(2).mean(-1).sqrt()
                ratios.setdefault(key, []).append(r)

            hooks.append(m.register_forward_hook(hook))
    embed()
    print("range / rms of each layer's input rows: median, 90 %, 99 %, max")
    for key, r in sorted(ratios.items()):
        r = torch.cat(r)
        qs = [round(float(r.quantile(q)), 2) for q in (0.5, 0.9, 0.99)] + [round(float(r.max()), 2)]
        print(f"  {key:18s} {qs}")


if __name__ == "__main__":
    main()
