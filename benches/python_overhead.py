"""Python package overhead and the Ray pipeline, against the Rust side, in
alternating rounds on the same machine (issue #23's measurements).

1. Per call, batch 32 (texts, images): ``mmembed bench SPEC`` (the Rust
   library through the ``Embedder`` trait, the same path the package takes)
   against ``mmembed.Embedder(SPEC).embed_*`` on the same backend.
2. A folder of images end to end: ``mmembed batch DIR -o out.parquet``
   against Ray Data (``read_binary_files`` → ``map_batches(RayEmbedder)``
   → ``write_parquet``) on ``ray.init(num_cpus=N)``.

Both sides must be release builds::

    cargo build --release -p mmembed-cli -p mmembed-shapes --example make-scenes
    cargo run --release --example random_vit_b32 -- /tmp/vit-b-32
    pip install ./crates/mmembed-python        # release by default
    python benches/python_overhead.py --vit /tmp/vit-b-32

Images on both sides of (1) are the same files (``mmembed bench --images``):
8 PNGs of the 640x480 pattern ``mmembed bench`` draws by default. Texts are
``mmembed bench``'s captions.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

import mmembed

ROOT = Path(__file__).resolve().parents[1]

# The captions of `mmembed bench` (crates/mmembed-cli/src/bench.rs).
CAPTIONS = [
    "a photo of a red circle",
    "a small blue square on the left",
    "a large green triangle",
    "a photo of a dog playing in the snow",
    "two cups of coffee on a wooden table",
    "a city street at night with neon signs",
    "a yellow star",
    "an aerial view of a river between mountains",
]


def png(rgb: np.ndarray) -> bytes:
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def bench_image(i: int) -> bytes:
    """`mmembed bench`'s test_image(i): the same pixels."""
    x = np.arange(640, dtype=np.int64)[None, :]
    y = np.arange(480, dtype=np.int64)[:, None]
    v = (x * (i + 3) + y * (2 * i + 1)) % 256
    rgb = np.stack(
        [v, np.broadcast_to(x % 256, v.shape), np.broadcast_to(y % 256, v.shape)], axis=-1
    ).astype(np.uint8)
    return png(rgb)


def rust_call(
    bin_: Path, spec: str, workload: str, iterations: int, image_files: list[Path]
) -> tuple[float, float]:
    """(p50 ms, items/s) from `mmembed bench` on the same image files."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "b.csv"
        images = [a for f in image_files for a in ("--images", str(f))]
        subprocess.run(
            [str(bin_), "bench", spec, "--workloads", workload, "--iterations", str(iterations),
             "--warmup", "2", "--csv", str(out), *images],
            check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        row = next(csv.DictReader(out.open()))
        if row["error"]:
            raise RuntimeError(row["error"])
        return float(row["p50_ms"]), float(row["throughput"])


def python_call(e, workload: str, iterations: int, images: list[bytes]) -> tuple[float, float]:
    kind, n = workload.split(":")
    n = int(n)
    if kind == "text":
        items = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
        call = lambda: e.embed_texts(items)  # noqa: E731
    else:
        items = [images[i % len(images)] for i in range(n)]
        call = lambda: e.embed_images(items)  # noqa: E731
    for _ in range(2):
        call()
    times = []
    for _ in range(iterations):
        t = time.perf_counter()
        r = call()
        times.append(time.perf_counter() - t)
        assert r.ok.all(), r.status
    return statistics.median(times) * 1e3, n * len(times) / sum(times)


def overhead(args) -> list[dict]:
    # 8 images of `mmembed bench`'s pattern, the same bytes on both sides
    # (given to `mmembed bench --images`), cycled through.
    images = [bench_image(i) for i in range(8)]
    img_dir = Path(tempfile.mkdtemp(prefix="mmembed-bench-images-"))
    image_files = []
    for i, data in enumerate(images):
        image_files.append(img_dir / f"{i}.png")
        image_files[-1].write_bytes(data)
    rows = []
    for spec in args.specs:
        e = mmembed.Embedder(spec)
        for workload in args.workloads:
            rust, py = [], []
            for _ in range(args.rounds):
                rust.append(rust_call(args.bin, spec, workload, args.iterations, image_files))
                py.append(python_call(e, workload, args.iterations, images))
            r50 = statistics.median(p for p, _ in rust)
            p50 = statistics.median(p for p, _ in py)
            rows.append(dict(
                spec=spec, workload=workload, rust_p50_ms=r50, python_p50_ms=p50,
                rust_items_s=statistics.median(t for _, t in rust),
                python_items_s=statistics.median(t for _, t in py),
                overhead_pct=100 * (p50 / r50 - 1),
                rounds=" ".join(f"{b / a - 1:+.1%}" for (a, _), (b, _) in zip(rust, py)),
            ))
            print(rows[-1], flush=True)
        del e
    return rows


def ray_vs_batch(args) -> list[dict]:
    import pyarrow.parquet as pq
    import ray

    from mmembed.ray import RayEmbedder

    media = Path(tempfile.mkdtemp(prefix="mmembed-ray-bench-"))
    subprocess.run([str(args.scenes), str(media), str(args.files)], check=True, capture_output=True)
    n_files = len(list(media.glob("*.png")))
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for spec in args.specs:
            model = spec.split(":", 1)[1].split("?")[0]
            cli_s, ray_s = [], []
            for _ in range(args.rounds):
                out = media.parent / "cli.parquet"
                t = time.perf_counter()
                done = subprocess.run(
                    [str(args.bin), "batch", str(media), "-o", str(out), "--model", model,
                     "--overwrite", "--batch-size", str(args.batch)],
                    capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                )
                cli_s.append(time.perf_counter() - t)
                assert done.returncode == 0, done.stderr
                assert pq.read_table(out).num_rows == n_files

                out_dir = media.parent / "ray-out"
                shutil.rmtree(out_dir, ignore_errors=True)
                t = time.perf_counter()
                ds = ray.data.read_binary_files(str(media), include_paths=True)
                ds = ds.map_batches(
                    RayEmbedder, fn_constructor_kwargs={"spec": spec},
                    batch_format="pyarrow", batch_size=args.batch, concurrency=1,
                )
                ds.write_parquet(str(out_dir))
                ray_s.append(time.perf_counter() - t)
                assert pq.read_table(out_dir).num_rows == n_files
            c, r = statistics.median(cli_s), statistics.median(ray_s)
            rows.append(dict(
                spec=spec, files=n_files, batch_images_s=n_files / c, ray_images_s=n_files / r,
                ray_vs_batch=c / r, batch_runs_s=[round(x, 2) for x in cli_s],
                ray_runs_s=[round(x, 2) for x in ray_s],
            ))
            print(rows[-1], flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(media, ignore_errors=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bin", type=Path, default=ROOT / "target/release/mmembed")
    p.add_argument("--scenes", type=Path, default=ROOT / "target/release/examples/make-scenes")
    p.add_argument("--vit", help="a ViT-B/32 checkpoint directory (random_vit_b32)")
    p.add_argument("--no-demo", action="store_true", help="leave the demo model out")
    p.add_argument("--workloads", nargs="+", default=["text:32", "image:32"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--files", type=int, default=256, help="images for the Ray comparison")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--ray-cpus", type=int, default=os.cpu_count())
    p.add_argument("--skip-ray", action="store_true")
    args = p.parse_args()
    args.specs = ([] if args.no_demo else ["local:demo"]) + ([f"local:{args.vit}"] if args.vit else [])
    print(f"python {sys.version.split()[0]}, mmembed {mmembed.__version__}, {os.cpu_count()} cpus")
    rows = overhead(args)
    print("\n| model | workload | Rust p50 ms | Python p50 ms | overhead | per round |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['spec']} | {r['workload']} | {r['rust_p50_ms']:.2f} | {r['python_p50_ms']:.2f} "
              f"| {r['overhead_pct']:+.1f} % | {r['rounds']} |")
    if not args.skip_ray:
        rows = ray_vs_batch(args)
        print("\n| model | files | mmembed batch img/s | Ray Data img/s | Ray / batch |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['spec']} | {r['files']} | {r['batch_images_s']:.1f} | {r['ray_images_s']:.1f} "
                  f"| {r['ray_vs_batch']:.2f} |")


if __name__ == "__main__":
    main()
