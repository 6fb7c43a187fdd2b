#!/usr/bin/env python3
"""HEIC decoding: `mmembed batch` (the system's libheif) against the Python
pipeline it stands in for (pillow-heif, then transformers' CLIP image
processor), on phone-sized photos; BENCHMARKS.md, "HEIC photos".

    python scripts/heic_bench.py --mmembed target/release/mmembed [--n 12] [--dir /tmp/heicbench]

Writes N synthetic 4032x3024 photos (a gradient with seeded noise) as HEIC
(pillow-heif, quality 85, with a 320x240 thumbnail as phones store one) and
as JPEG (quality 90) into DIR unless they are there (about a minute each on
2 cores: x265 is slow), then times two rounds of each stack with the
bundled demo model's preprocessing: whole, and with the thumbnail
(`mmembed batch --heic-thumbnail`; `Image.draft` with pillow-heif), over
--copies links to each photo (the thumbnails decode in milliseconds).

Requirements (PyPI): numpy, pillow, pillow-heif, transformers.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pillow_heif
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def make(out: Path, n: int) -> None:
    (out / "heic").mkdir(parents=True, exist_ok=True)
    (out / "jpg").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    h, w = 3024, 4032
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([255 * xx / w, 255 * yy / h, 128 + 100 * np.sin((xx + yy) / 40)], -1)
    for i in range(n):
        noise = rng.normal(0, 3, (h, w, 3)).astype(np.float32)
        heic, jpg = out / "heic" / f"p{i:03d}.heic", out / "jpg" / f"p{i:03d}.jpg"
        if heic.exists() and jpg.exists():
            continue
        im = Image.fromarray(np.clip(base + noise + i, 0, 255).astype(np.uint8))
        im.save(jpg, quality=90)
        im.save(heic.with_suffix(".tmp"), "HEIF", quality=85, thumbnails=[320])
        heic.with_suffix(".tmp").rename(heic)
        print(f"wrote {heic.name}", flush=True)


def copies(folder: Path, k: int) -> Path:
    """A folder of k hard links to each file of `folder`."""
    many = folder.parent / f"{folder.name}_x{k}"
    many.mkdir(exist_ok=True)
    for f in sorted(folder.iterdir()):
        for c in range(k):
            link = many / f"{f.stem}_{c}{f.suffix}"
            if not link.exists():
                os.link(f, link)
    return many


def ours(binary: str, folder: Path, draft: bool = False) -> tuple[float, float]:
    out = folder.parent / f"out_{folder.name}.jsonl"
    out.unlink(missing_ok=True)
    t, before = time.perf_counter(), os.times()
    subprocess.run(
        [binary, "batch", str(folder), "-o", str(out), "--model", "demo", *(["--heic-thumbnail"] if draft else [])],
        check=True,
        capture_output=True,
    )
    after = os.times()
    return time.perf_counter() - t, after.children_user - before.children_user


def python_pipeline(folder: Path, preprocess: bool, draft: bool = False) -> float:
    from transformers import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil.from_pretrained(ROOT / "models" / "demo")
    edge = proc.size["shortest_edge"]
    files = sorted(glob.glob(str(folder / "*")))
    t = time.perf_counter()
    for f in files:
        img = Image.open(f)
        if draft:
            # The size the processor resizes to: what the draft must cover.
            w, h = img.size
            s = edge / min(w, h)
            img.draft("RGB", (max(edge, int(w * s)), max(edge, int(h * s))))
        img = img.convert("RGB")
        if preprocess:
            proc(images=img, return_tensors="np")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mmembed", default=str(ROOT / "target" / "release" / "mmembed"))
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--dir", default="/tmp/heicbench")
    ap.add_argument("--copies", type=int, default=20, help="links to each photo for the thumbnail runs")
    args = ap.parse_args()
    pillow_heif.register_heif_opener()
    out = Path(args.dir)
    make(out, args.n)
    n = len(list((out / "heic").glob("*.heic")))
    print(f"{n} photos, HEIC {sum(p.stat().st_size for p in (out / 'heic').iterdir()) / n / 1e6:.1f} MB each")
    many = copies(out / "heic", args.copies)
    m = n * args.copies
    for r in (1, 2):
        for kind in ("heic", "jpg"):
            wall, user = ours(args.mmembed, out / kind)
            print(f"round {r} mmembed {kind}: {wall:.2f} s wall, {user:.1f} s CPU, {n / wall:.2f} images/s")
        wall, user = ours(args.mmembed, many, draft=True)
        print(f"round {r} mmembed heic --heic-thumbnail ({m}): {wall:.2f} s wall, {user:.1f} s CPU, {m / wall:.1f} images/s")
        for pre in (True, False):
            wall = python_pipeline(out / "heic", pre)
            what = "decode+preprocess" if pre else "decode"
            print(f"round {r} pillow-heif {what}: {wall:.2f} s, {n / wall:.2f} images/s")
        wall = python_pipeline(many, True, draft=True)
        print(f"round {r} pillow-heif draft decode+preprocess ({m}): {wall:.2f} s, {m / wall:.1f} images/s")


if __name__ == "__main__":
    main()
