"""Fixtures: demo media drawn by `make-scenes`, broken files beside them,
and the rows `mmembed batch` makes for them (the reference every Python
path must reproduce)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("MMEMBED_BIN", ROOT / "target/debug/mmembed"))
SCENES = Path(os.environ.get("MMEMBED_MAKE_SCENES", ROOT / "target/debug/examples/make-scenes"))
INTERVAL = 4


def cli(*args: str, env: dict[str, str] | None = None, check: bool = True):
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [str(BIN), *args], capture_output=True, text=True, env=full_env, check=check
    )


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> Path:
    """6 scenes, a 16-second slideshow (4 segments of 4 s) and 4 broken files."""
    if not SCENES.exists() or not BIN.exists():
        pytest.fail(f"build first: {BIN} and {SCENES} (cargo test builds both)")
    d = tmp_path_factory.mktemp("media")
    subprocess.run([str(SCENES), str(d), "6", "--slideshow"], check=True, capture_output=True)
    (d / "garbage.png").write_bytes(b"not an image at all")
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.txt").write_text("not media")
    video = (d / "slideshow.mp4").read_bytes()
    (d / "cut.mp4").write_bytes(video[: len(video) // 3])
    return d


@pytest.fixture(scope="session")
def cli_rows(media, tmp_path_factory) -> dict:
    """`mmembed batch` rows keyed by (uri, segment start)."""
    out = tmp_path_factory.mktemp("cli") / "rows.parquet"
    # Exit status 1: some rows failed (the broken files), as they should.
    done = cli(
        "batch", str(media), "-o", str(out), "--model", "demo", "--interval", str(INTERVAL),
        check=False,
    )
    assert done.returncode == 1 and "4 failed" in done.stdout + done.stderr, done.stderr
    return rows_by_key(pq.read_table(out))


def rows_by_key(table) -> dict:
    rows = {}
    for r in table.to_pylist():
        key = (r["uri"], r["video_start_sec"])
        assert key not in rows, f"duplicate row {key}"
        rows[key] = r
    return rows


def assert_same_rows(got: dict, want: dict, *, ignore_identity: bool = False) -> None:
    """Same objects, segments, statuses, model and space; vectors within 1e-6."""
    assert sorted(got, key=str) == sorted(want, key=str)
    for key, w in want.items():
        g = got[key]
        assert g["status"] == w["status"], key
        for c in ("content_type", "video_end_sec", "model", "space", "dimension"):
            assert g[c] == w[c], (key, c)
        if not ignore_identity:
            assert g["size_bytes"] == w["size_bytes"], key
        if w["embedding"] is None:
            assert g["embedding"] is None, key
        else:
            assert g["embedding"] is not None, key
            diff = max(abs(a - b) for a, b in zip(g["embedding"], w["embedding"]))
            assert len(g["embedding"]) == len(w["embedding"]) and diff <= 1e-6, (key, diff)


@pytest.fixture(scope="session")
def embedder():
    import mmembed

    return mmembed.Embedder("local:demo")
