#!/usr/bin/env python3
"""PyTorch's side of `scripts/gpu-check.sh`, on the GPU machine's own Python
(torch, transformers, safetensors, numpy, pillow; nothing is downloaded).

    torch_side.py make MODEL_DIR                 seeded random ViT-B/32, fp32
    torch_side.py inputs INPUTS_DIR              texts + ids, pixel_values
    torch_side.py reference MODEL INPUTS OUT     PyTorch's unit vectors per precision
    torch_side.py compare INPUTS OUT             cosines, ours against PyTorch's
    torch_side.py speed MODEL [--precisions ...] [--images ...] [--texts ...]
                        [--compile bf16] [--seconds 3]
    torch_side.py jpegs DIR COUNT                JPEG photos for the end-to-end run
    torch_side.py report OUT                     OUT/report.md from the JSON lines

The checkpoint is `make_fixtures.py --full`'s: OpenAI ViT-B/32's
architecture with `torch.manual_seed(SEED)` weights (605 MB, so made there
rather than carried). Inputs are the committed parity inputs: the texts and
token ids of models/fixtures/tiny-clip/reference.json (Hugging Face's
CLIPTokenizer over OpenAI's vocabulary, which ViT-B/32 shares) and the
committed Pillow crops of the real photos, normalised as CLIPImageProcessor
does (make_fixtures.py checks that equality to 1e-5).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "models" / "fixtures"
sys.path.insert(0, str(FIXTURES))
# The seed and architecture of `make_fixtures.py --full`, from there.
from make_fixtures import PREPROCESSOR, SEED, vit_b32_config  # noqa: E402

MEAN, STD = PREPROCESSOR["image_mean"], PREPROCESSOR["image_std"]
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def make(model_dir: Path) -> None:
    from transformers import CLIPModel

    torch.manual_seed(SEED)
    model = CLIPModel(vit_b32_config()).eval()
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(model_dir), safe_serialization=True)
    tiny = FIXTURES / "tiny-clip"
    for f in ("tokenizer.json", "preprocessor_config.json"):
        (model_dir / f).write_bytes((tiny / f).read_bytes())
    print(f"seeded ViT-B/32 (seed {SEED}) in {model_dir}")


def inputs(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ref = json.loads((FIXTURES / "tiny-clip" / "reference.json").read_text())
    texts = [{"text": t["text"], "ids": t["ids"]} for t in ref["texts"]]
    crops = load_file(str(FIXTURES / "images" / "crops.safetensors"))
    keys = [i["key"] for i in ref["images"]]
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    px = torch.stack([(crops[k].float() * (1 / 255) - mean) / std for k in keys]).contiguous()
    save_file({"pixel_values": px}, str(out / "pixels.safetensors"))
    (out / "inputs.json").write_text(json.dumps({"texts": texts, "images": keys}, ensure_ascii=False))
    print(f"{len(texts)} texts, {len(keys)} images in {out}")


def load_model(model_dir: Path, dtype: torch.dtype, device: str):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(str(model_dir), dtype=dtype).eval().to(device)


def features(out) -> torch.Tensor:
    return out.pooler_output if hasattr(out, "pooler_output") else out


@torch.inference_mode()
def reference(model_dir: Path, inp: Path, out: Path, device: str, precisions: list[str]) -> None:
    meta = json.loads((inp / "inputs.json").read_text())
    seqs = [t["ids"] for t in meta["texts"]]
    n = max(map(len, seqs))
    ids = torch.tensor([s + [49407] * (n - len(s)) for s in seqs], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs], device=device)
    px = load_file(str(inp / "pixels.safetensors"))["pixel_values"].to(device)
    for p in precisions:
        model = load_model(model_dir, DTYPES[p], device)
        t = features(model.get_text_features(input_ids=ids, attention_mask=mask)).float()
        i = features(model.get_image_features(pixel_values=px.to(DTYPES[p]))).float()
        norm = lambda x: torch.nn.functional.normalize(x, dim=-1).cpu().contiguous()  # noqa: E731
        save_file({"text": norm(t), "image": norm(i)}, str(out / f"torch_{p}.safetensors"))
        del model
        print(f"PyTorch {p} references written")


def compare(inp: Path, out: Path) -> None:
    """Cosines of our unit vectors to PyTorch's, per precision, as JSON lines."""
    truth = load_file(str(out / "torch_f32.safetensors"))
    rows = []
    for p in DTYPES:
        ours_file = out / f"ours_{p}.safetensors"
        if not ours_file.exists():
            continue
        ours = load_file(str(ours_file))
        same = load_file(str(out / f"torch_{p}.safetensors")) if (out / f"torch_{p}.safetensors").exists() else None
        for kind in ("text", "image"):
            c = (ours[kind] * truth[kind]).sum(-1)
            row = {"check": "cosine", "precision": p, "kind": kind, "n": len(c),
                   "min_vs_torch_f32": float(c.min()), "mean_vs_torch_f32": float(c.mean())}
            if same is not None:
                row["min_vs_torch_same"] = float((ours[kind] * same[kind]).sum(-1).min())
                # PyTorch's own reduced-precision error, for scale.
                row["torch_same_vs_torch_f32"] = float((same[kind] * truth[kind]).sum(-1).min())
            goal = 0.99999 if p == "f32" else 0.999
            row["goal"] = goal
            row["pass"] = row["min_vs_torch_f32"] >= goal
            rows.append(row)
            print(json.dumps(row))
    (out / "parity.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if not all(r["pass"] for r in rows):
        sys.exit("parity below the goal (see parity.jsonl)")


def timed(fn, device: str, seconds: float) -> float:
    """Seconds per call: 2 warm-ups, then enough calls for `seconds`."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    t = time.perf_counter()
    fn()
    sync()
    one = max(time.perf_counter() - t, 1e-6)
    n = int(min(max(seconds / one, 3), 100_000))
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t) / n


@torch.inference_mode()
def speed(model_dir: Path, device: str, precisions: list[str], images: list[int], texts: list[int],
          compile_precisions: list[str], seconds: float) -> None:
    for p in precisions + [f"compile:{c}" for c in compile_precisions]:
        compiled = p.startswith("compile:")
        prec = p.split(":")[-1]
        model = load_model(model_dir, DTYPES[prec], device)
        vision = lambda x: model.get_image_features(pixel_values=x)  # noqa: E731
        text = lambda x: model.get_text_features(input_ids=x)  # noqa: E731
        if compiled:
            vision, text = torch.compile(vision), torch.compile(text)
        stack = "pytorch-compile" if compiled else "pytorch-eager"
        for b in images:
            x = torch.randn(b, 3, 224, 224, device=device, dtype=DTYPES[prec])
            s = timed(lambda: vision(x), device, seconds)
            print(json.dumps({"stack": stack, "precision": prec, "workload": "images", "batch": b,
                              "ms": s * 1e3, "per_s": b / s}), flush=True)
        for b in texts:
            ids = torch.randint(0, 49405, (b, 77), device=device)
            ids[:, -1] = 49407
            s = timed(lambda: text(ids), device, seconds)
            print(json.dumps({"stack": stack, "precision": prec, "workload": "texts77", "batch": b,
                              "ms": s * 1e3, "per_s": b / s}), flush=True)
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def _jpeg(args) -> None:
    from PIL import Image

    i, src, out, (w, h) = args
    rng = np.random.default_rng(i)
    im = Image.open(src).convert("RGB").resize((w, h))
    a = np.asarray(im).astype(np.int16) + rng.integers(-8, 9, (h, w, 3))
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(out / f"{i:06d}.jpg", quality=90)


def jpegs(out: Path, count: int, size: tuple[int, int] = (640, 480)) -> None:
    """JPEGs of `size` (quality 90) from the committed photos with per-file
    noise, so no two files decode alike."""
    from multiprocessing import Pool

    out.mkdir(parents=True, exist_ok=True)
    photos = sorted(p for p in (FIXTURES / "images").iterdir() if p.suffix in (".png", ".jpg"))
    with Pool(os.cpu_count()) as pool:
        pool.map(_jpeg, [(i, photos[i % len(photos)], out, size) for i in range(count)],
                 chunksize=max(1, min(64, count // (4 * (os.cpu_count() or 1)))))
    print(f"{count} {size[0]}x{size[1]} JPEGs in {out}")


def lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.startswith("{")]


def ncu_summary(path: Path, what: str = "image") -> list:
    """Nsight Compute's per-kernel durations (`--csv`, one metric) as a
    table of kernels by share of the summed time."""
    if not path.exists():
        return []
    text = path.read_text(errors="replace").splitlines()
    start = next((i for i, l in enumerate(text) if l.startswith('"ID"')), None)
    if start is None:
        return ["", f"Nsight Compute gave no kernel table for the {what} forward (see {path.name})."]
    total, by = 0.0, {}
    for row in csv.DictReader(text[start:]):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        ns = float(row["Metric Value"].replace(",", ""))
        name = row["Kernel Name"]
        name = name if len(name) <= 70 else name[:67] + "..."
        t, n = by.get(name, (0.0, 0))
        by[name] = (t + ns, n + 1)
        total += ns
    if not total:
        return []
    md = ["", f"## Nsight Compute: our bf16 {what} forward at batch 256 ({sum(n for _, n in by.values())} kernels, "
          f"{total / 1e3:,.0f} µs summed)", "", "| kernel | share | calls | mean µs |", "|---|---|---|---|"]
    for name, (t, n) in sorted(by.items(), key=lambda kv: -kv[1][0])[:15]:
        md.append(f"| `{name}` | {100 * t / total:.1f} % | {n} | {t / n / 1e3:,.1f} |")
    return md


def pipeline(log: Path) -> str:
    """Where the local backend's threads spent a batch run: its last
    "local pipeline" debug line (cumulative), as shares of the wall time."""
    if not log.exists():
        return ""
    found = [l for l in log.read_text(errors="replace").splitlines() if "local pipeline since" in l]
    if not found:
        return ""
    f = dict(re.findall(r"(\w+)=([0-9.e+-]+)", found[-1]))
    try:
        wall = float(f["wall_s"])
        share = lambda k: 100 * float(f[k]) / wall if wall > 0 else 0
        return (f"; pipeline over {wall:.2f} s: model thread busy {share('model_busy_s'):.0f} %, "
                f"images being decoded {share('decoding_s'):.0f} %, "
                f"waiting for calls {share('waiting_for_calls_s'):.0f} %")
    except (KeyError, ValueError):
        return ""


def report(out: Path) -> None:
    """report.md: machine, parity table, throughput side by side, end to end."""
    env = json.loads((out / "env.json").read_text()) if (out / "env.json").exists() else {}
    parity = lines(out / "parity.jsonl")
    speed_rows = lines(out / "speed_ours.jsonl") + lines(out / "speed_torch.jsonl")
    e2e = lines(out / "e2e.jsonl")
    md = ["# GPU check report", ""]
    for k, v in env.items():
        md.append(f"- {k}: {v}")
    tests = lines(out / "kernel_tests.jsonl")
    if tests:
        # mmembed-candle's on_cuda tests: each of our kernels against its
        # reference, and the largest differences they printed.
        md += ["", "## Our CUDA kernels against their references (`on_cuda` tests)", ""]
        for r in tests:
            md.append(f"- `{r['test']}`: {'ok' if r['ok'] else '**failed** (exit ' + str(r['rc']) + ')'}, "
                      f"{r['seconds']:.1f} s")
        found = (out / "kernel_tests.txt").read_text(errors="replace").splitlines() \
            if (out / "kernel_tests.txt").exists() else []
        diffs = [l.strip() for l in found if "max diff" in l or "max abs diff" in l]
        if diffs:
            md += ["", "```"] + diffs + ["```"]
    families = lines(out / "families.jsonl")
    if families:
        # gpu_check families: each tiny fixture model on this device
        # against PyTorch's fp32 embeddings committed with it.
        md += ["", "## Every family's tiny fixture (cosine to PyTorch fp32, committed references)", "",
               "| model | precision | min text | min image | mean | bars (text, image, mean) | pass |",
               "|---|---|---|---|---|---|---|"]
        for r in families:
            if "error" in r:
                md.append(f"| {r['model']} | {r['precision']} | error: {r['error']} | | | | **no** |")
                continue
            md.append(f"| {r['model']} | {r['precision']} | {r['text_min']:.7f} | {r['image_min']:.7f} | "
                      f"{r['mean']:.7f} | {', '.join(str(b) for b in r['bars'])} | "
                      f"{'yes' if r['pass'] else '**no**'} |")
    md += ["", "## Parity (cosine of unit vectors; PyTorch fp32 on the same GPU is the truth)", "",
           "| ours | kind | n | min | mean | goal | PyTorch same precision vs fp32 (min) | pass |",
           "|---|---|---|---|---|---|---|---|"]
    for r in parity:
        md.append(f"| {r['precision']} | {r['kind']} | {r['n']} | {r['min_vs_torch_f32']:.7f} | "
                  f"{r['mean_vs_torch_f32']:.7f} | {r['goal']} | "
                  f"{r.get('torch_same_vs_torch_f32', float('nan')):.7f} | {'yes' if r['pass'] else '**no**'} |")
    pixels = [r for r in lines(out / "parity_ours.jsonl") if r.get("check") == "u8_pixels"]
    if pixels:
        md.append("")
    for r in pixels:
        # The model's input from the crops' bytes (what `mmembed batch`
        # sends), normalised on the device, against the host's floats.
        how = (f"error: {r['error']}" if "error" in r
               else f"max abs diff {r.get('max_abs_diff', float('nan')):.2e}")
        md.append(f"- {r['precision']} ({r['graph']} graph): the crops' bytes normalised on the device: "
                  f"{r['differ']} of {r['values']:,} values differ from the host's "
                  f"({how}){'' if r['differ'] == 0 else ' **fails**'}")
    md += ["", "## Throughput, model only (inputs on the GPU), per second", ""]
    host_kinds = ("images_from_host", "images_from_host_u8", "u8_vs_f32_rows")
    keys = sorted({(r["workload"], r["batch"]) for r in speed_rows if r["workload"] not in host_kinds},
                  key=lambda k: (k[0], k[1]))
    stacks = sorted({(r["stack"], r["precision"]) for r in speed_rows})
    # One ratio column per graph of ours timed in bf16 (`mmembed`: the
    # device's default; `mmembed-portable`: candle's own ops).
    ours_stacks = [s for s, p in stacks if s.startswith("mmembed") and p == "bf16"]
    md.append("| workload | batch | " + " | ".join(f"{s} {p}" for s, p in stacks) + " | "
              + " | ".join(f"{s} bf16 / eager bf16" for s in ours_stacks) + " |")
    md.append("|---|---|" + "---|" * (len(stacks) + len(ours_stacks)))
    index = {(r["stack"], r["precision"], r["workload"], r["batch"]): r["per_s"] for r in speed_rows if "per_s" in r}
    for w, b in keys:
        cells = [f"{index[(s, p, w, b)]:,.0f}" if (s, p, w, b) in index else "–" for s, p in stacks]
        theirs = index.get(("pytorch-eager", "bf16", w, b))
        ratios = []
        for s in ours_stacks:
            ours = index.get((s, "bf16", w, b))
            ratios.append(f"{ours / theirs:.2f}×" if ours and theirs else "–")
        md.append(f"| {w} | {b} | " + " | ".join(cells + ratios) + " |")
    host = [r for r in speed_rows if r["workload"] in ("images_from_host", "images_from_host_u8")]
    if host:
        md += ["", "Images through the library's calls (host pixels up, unit vectors down; "
               "`f32`: normalised pixels, `u8`: the crops' bytes, normalised on the GPU, "
               "what `mmembed batch` sends):", ""]
        for r in host:
            model_only = index.get(("mmembed", r["precision"], "images", r["batch"]))
            note = f" (model only {model_only:,.0f}/s: transfers and host work cost " \
                   f"{100 * (1 - r['per_s'] / model_only):.0f} %)" if model_only else ""
            kind = "u8" if r["workload"].endswith("_u8") else "f32"
            md.append(f"- {r['precision']} {kind} batch {r['batch']}: {r['per_s']:,.0f} images/s{note}")
        for r in speed_rows:
            if r["workload"] == "u8_vs_f32_rows":
                md.append(f"- {r['precision']}: u8 rows normalised on the GPU vs host f32 rows, "
                          f"{r['batch']} images: max abs diff of the unit vectors {r['max_abs_diff']:.2e}")
    decode = lines(out / "decode.jsonl")
    if decode:
        md += ["", "## Decode and preprocess on the host's cores (no model), per second", ""]
        for r in decode:
            how = "reduced (`--jpeg-draft`)" if r["workload"].endswith("_draft") else "exact"
            md.append(f"- {r.get('photos', '?')} JPEGs, {how}: {r['per_s']:,.0f} images/s "
                      f"on {r['threads']} threads")
    if e2e:
        md += ["", "## End to end: JPEG files through `mmembed batch`", ""]
        for r in e2e:
            md.append("- " + ", ".join(f"{k} {v}" for k, v in r.items()) + pipeline(out / f"batch_{r['run']}.log"))
        checked = out / "e2e_rows.txt"
        if checked.exists():
            md += [f"- output of the large run: {l}" for l in checked.read_text().splitlines() if l]
    fallback = out / "fallback.txt"
    if fallback.exists():
        # One line per graph that failed parity on this machine.
        md += [""] + ["**" + line.strip().lstrip("! ") + "**  "
                      for line in fallback.read_text().splitlines() if line.strip()]
    md += ncu_summary(out / "ncu.csv")
    md += ncu_summary(out / "ncu_texts.csv", "text")
    (out / "report.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("make").add_argument("model", type=Path)
    sub.add_parser("inputs").add_argument("out", type=Path)
    r = sub.add_parser("reference")
    r.add_argument("model", type=Path)
    r.add_argument("inputs", type=Path)
    r.add_argument("out", type=Path)
    r.add_argument("--device", default="cuda")
    r.add_argument("--precisions", default="f32,f16,bf16")
    c = sub.add_parser("compare")
    c.add_argument("inputs", type=Path)
    c.add_argument("out", type=Path)
    s = sub.add_parser("speed")
    s.add_argument("model", type=Path)
    s.add_argument("--device", default="cuda")
    s.add_argument("--precisions", default="f32,f16,bf16")
    s.add_argument("--images", default="1,32,256,1024")
    s.add_argument("--texts", default="32,256")
    s.add_argument("--compile", default="", help="precisions to also time under torch.compile")
    s.add_argument("--seconds", type=float, default=3.0)
    j = sub.add_parser("jpegs")
    j.add_argument("out", type=Path)
    j.add_argument("count", type=int)
    j.add_argument("--size", default="640x480", help="WIDTHxHEIGHT")
    sub.add_parser("report").add_argument("out", type=Path)
    a = ap.parse_args()
    nums = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    words = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    if a.cmd == "make":
        make(a.model)
    elif a.cmd == "inputs":
        inputs(a.out)
    elif a.cmd == "reference":
        reference(a.model, a.inputs, a.out, a.device, words(a.precisions))
    elif a.cmd == "compare":
        compare(a.inputs, a.out)
    elif a.cmd == "speed":
        speed(a.model, a.device, words(a.precisions), nums(a.images), nums(a.texts), words(a.compile), a.seconds)
    elif a.cmd == "jpegs":
        jpegs(a.out, a.count, tuple(int(x) for x in a.size.split("x")))
    elif a.cmd == "report":
        report(a.out)


if __name__ == "__main__":
    main()
