#!/usr/bin/env python3
"""ONNX Runtime's time per op type for the `local_clip` bench's model, to set
beside `scripts/perf_by_op.py`'s profile of ours (issue #24).

    python3 scripts/ort_profile.py --threads 2 [--iters 10]

Builds bench_pytorch.py's random ViT-B/32, exports and quantises it as the
bench does (bench_pytorch.Ort), runs each workload ITERS times with ORT's
profiler on, and prints each op type's share of the node time (the
profiler's per-node `dur`, first call excluded) per stack and workload.
"""

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models" / "fixtures"))

import torch  # noqa: E402
from transformers import CLIPModel  # noqa: E402

import bench_pytorch as bp  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--workloads", default="images:1,images:32,texts77:32")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = CLIPModel(bp.vit_b32()).eval()
    for prec in ("fp32", "int8"):
        for w in a.workloads.split(","):
            name, batch = w.split(":")
            with torch.no_grad():
                ort_stack = bp.Ort(model, a.threads, profile=True)
            fn = ort_stack.workload(prec, name, int(batch))
            for _ in range(a.iters + 1):
                fn()
            kind = "images" if name == "images" else "texts"
            trace = ort_stack.sessions[(prec, kind)].end_profiling()
            events = json.loads(Path(trace).read_text())
            by_op = collections.Counter()
            runs = [e for e in events if e.get("name") == "model_run"]
            first_end = runs[0]["ts"] + runs[0]["dur"] if runs else 0
            for e in events:
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first_end:
                    by_op[e["args"].get("op_name", "?")] += e["dur"]
            total = sum(by_op.values())
            per_call_ms = total / 1e3 / a.iters
            shares = ", ".join(f"{op} {100 * t / total:.1f} %" for op, t in by_op.most_common(8))
            print(f"ort-{prec} {name}/{batch}: {per_call_ms:.1f} ms of node time per call; {shares}", flush=True)


if __name__ == "__main__":
    main()
