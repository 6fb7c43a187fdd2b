"""The Python API on the demo model: shapes, dtypes, statuses, nearest
neighbours, the GIL released, errors, and rows equal to `mmembed batch`'s."""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mmembed
from conftest import INTERVAL, ROOT, assert_same_rows, cli, rows_by_key


def test_info_and_repr(embedder):
    info = embedder.info
    assert info["backend"] == "local"
    assert info["model"] == "demo"
    assert info["dimension"] == 64
    assert info["space"].startswith("clip-")
    assert set(info["modalities"]) == {"text", "image", "video"}
    assert "demo" in repr(embedder) and embedder.spec == "local:demo"


def test_texts_are_float32_unit_vectors_with_a_status_per_item(embedder):
    r = embedder.embed_texts(["a red star", "   ", "a blue square"])
    assert isinstance(r.embeddings, np.ndarray)
    assert r.embeddings.dtype == np.float32 and r.embeddings.shape == (3, 64)
    assert r.embeddings.flags["C_CONTIGUOUS"]
    assert r.status[0] == "" and r.status[2] == ""
    assert "empty" in r.status[1]
    assert r.ok.tolist() == [True, False, True]
    assert np.isnan(r.embeddings[1]).all()
    norms = np.linalg.norm(r.embeddings[r.ok], axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    assert r.input_index.tolist() == [0, 1, 2]
    assert np.isnan(r.start_sec).all()
    assert len(r) == 3 and r.model == "demo"
    # The same text twice gives the same vector: one batch or two.
    again = embedder.embed_texts(["a red star"])
    np.testing.assert_array_equal(again.embeddings[0], r.embeddings[0])


def test_known_nearest_neighbours(embedder, media):
    names = sorted(p.name for p in media.glob("*.png") if p.name[0] in "ls")
    imgs = embedder.embed_images([str(media / n) for n in names])
    assert all(s == "" for s in imgs.status), imgs.status
    queries = {
        "a small purple cross": "small-purple-cross-left.png",
        "a large blue square": "large-blue-square-bottom.png",
        "a large black triangle": "large-black-triangle-left.png",
        "a small white circle": "small-white-circle-center.png",
    }
    q = embedder.embed_texts(list(queries))
    best = (q.embeddings @ imgs.embeddings.T).argmax(axis=1)
    assert [names[i] for i in best] == list(queries.values())


def test_images_from_bytes_paths_and_pathlike_agree(embedder, media):
    p = media / "large-blue-square-bottom.png"
    data = p.read_bytes()
    r = embedder.embed_images([data, str(p), p, bytearray(data), memoryview(data)])
    assert r.status == [""] * 5
    for row in r.embeddings[1:]:
        np.testing.assert_array_equal(row, r.embeddings[0])


def test_broken_images_fail_alone(embedder, media):
    r = embedder.embed_images(
        [media / "garbage.png", media / "large-blue-square-bottom.png", b"", media / "nope.png"]
    )
    assert r.ok.tolist() == [False, True, False, False]
    assert "cannot decode" in r.status[0]
    assert "not found" in r.status[3] or "No such file" in r.status[3]
    assert np.isnan(r.embeddings[[0, 2, 3]]).all()


def test_video_segments_match_the_cli(embedder, media, cli_rows):
    video = media / "slideshow.mp4"
    r = embedder.embed_videos([video, media / "cut.mp4", b"junk"], interval_sec=INTERVAL)
    seg = [i for i in range(len(r)) if r.input_index[i] == 0]
    assert [(r.start_sec[i], r.end_sec[i]) for i in seg] == [(0, 4), (4, 8), (8, 12), (12, 16)]
    for i in seg:
        want = cli_rows[(str(video), r.start_sec[i])]
        assert r.status[i] == want["status"] == ""
        np.testing.assert_allclose(r.embeddings[i], want["embedding"], atol=1e-6)
    junk = [i for i in range(len(r)) if r.input_index[i] == 2]
    assert len(junk) == 1 and r.status[junk[0]] != ""


def test_arrow_rows_equal_the_cli_rows(embedder, media, cli_rows):
    files = sorted(str(p) for p in media.iterdir())
    table = pa.table({"uri": files, "tag": [f"t{i}" for i in range(len(files))]})
    out = embedder.embed_arrow(table, interval_sec=INTERVAL)
    assert isinstance(out, pa.Table)
    assert out.schema.field("embedding").type == pa.list_(pa.float32(), 64)
    assert out.schema.field("embedding").type == mmembed.embedding_dtype(64)
    got = rows_by_key(out)
    assert_same_rows(got, cli_rows)
    # Carried columns keep their values on every row of their object.
    tags = dict(zip(files, table["tag"].to_pylist()))
    assert all(r["tag"] == tags[r["uri"]] for r in got.values())
    # A record batch in, a record batch out; bytes instead of paths.
    data = [open(f, "rb").read() for f in files]
    batch = pa.RecordBatch.from_pydict({"path": files, "bytes": data})
    out = embedder.embed_arrow(batch, interval_sec=INTERVAL)
    assert isinstance(out, pa.RecordBatch)
    # Bytes carry no modification time; the rest is the same.
    assert_same_rows(rows_by_key(out), cli_rows, ignore_identity=True)


def test_objects_without_an_extension_are_typed_as_the_cli_types_them(embedder, media, tmp_path):
    """A ``content_type`` column (an object table's) types the objects; a
    name without an extension is told by its bytes; the vector is the
    named file's."""
    png = next(p for p in sorted(media.iterdir()) if p.suffix == ".png" and "garbage" not in p.name)
    named = embedder.embed_images([str(png)])
    blob = tmp_path / "3f2a9c"
    blob.write_bytes(png.read_bytes())
    batch = pa.RecordBatch.from_pydict(
        {
            "uri": [str(blob), str(blob), "in-memory", "in-memory"],
            "bytes": [None, None, png.read_bytes(), b"plain text"],
            "content_type": [None, "text/plain", "image/png", None],
        }
    )
    out = embedder.embed_arrow(batch).to_pylist()
    assert [r["content_type"] for r in out] == [
        "image/png",
        "text/plain",
        "image/png",
        "application/octet-stream",
    ]
    assert [r["status"] == "" for r in out] == [True, False, True, False]
    assert "unsupported file type" in out[1]["status"] and "text/plain" in out[1]["status"]
    for r in (out[0], out[2]):
        np.testing.assert_allclose(r["embedding"], named.embeddings[0], atol=1e-6, rtol=0)
    assert len([c for c in embedder.embed_arrow(batch).column_names if c == "content_type"]) == 1


def test_remote_objects_without_an_extension_are_typed_by_their_bytes(embedder, media, tmp_path):
    """A URL named without an extension (served as octet-stream) is typed
    by its first bytes before the backend reads it, as `mmembed batch`
    types it; one whose bytes are no media fails alone as unsupported."""
    import functools
    import http.server

    png = next(p for p in sorted(media.iterdir()) if p.suffix == ".png" and "garbage" not in p.name)
    named = embedder.embed_images([str(png)])
    (tmp_path / "3f2a9c").write_bytes(png.read_bytes())
    (tmp_path / "77").write_bytes(b"plain text")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        batch = pa.RecordBatch.from_pydict({"uri": [f"{url}/3f2a9c", f"{url}/77", f"{url}/gone"]})
        out = embedder.embed_arrow(batch).to_pylist()
    finally:
        server.shutdown()
        server.server_close()
    assert out[0]["status"] == "", out[0]
    assert out[0]["content_type"] == "image/png"
    assert out[0]["size_bytes"] == png.stat().st_size
    np.testing.assert_allclose(out[0]["embedding"], named.embeddings[0], atol=1e-6, rtol=0)
    assert "unsupported file type" in out[1]["status"], out[1]
    assert "not found" in out[2]["status"], out[2]


@pytest.mark.parametrize(
    "key, photo",
    [
        # The 640x427 photo at 1/4 for the demo model's 64-pixel input.
        ("jpeg_draft", "images/rocket_640x427.jpg"),
        # The 400x300 photo as its 320x240 thumbnail.
        ("heic_thumbnail", "heic/photo_400x300.heic"),
    ],
)
def test_drafts_in_the_spec_are_the_cli_flags(embedder, tmp_path, key, photo):
    """`?jpeg_draft=true` and `?heic_thumbnail=true` decode as `mmembed batch
    --jpeg-draft` and `--heic-thumbnail` do, which is not the exact decode."""
    photo = ROOT / "models/fixtures" / photo
    d = tmp_path / "photos"
    d.mkdir()
    (d / photo.name).write_bytes(photo.read_bytes())
    out = tmp_path / "draft.parquet"
    cli("batch", str(d), "-o", str(out), "--model", "demo", "--" + key.replace("_", "-"))
    want = np.array(pq.read_table(out)["embedding"].to_pylist()[0], dtype=np.float32)
    drafted = mmembed.Embedder(f"local:demo?{key}=true").embed_images([str(photo)])
    assert drafted.status == [""]
    np.testing.assert_allclose(drafted.embeddings[0], want, atol=1e-6, rtol=0)
    exact = embedder.embed_images([str(photo)])
    assert exact.status == [""]
    assert np.abs(exact.embeddings[0] - want).max() > 1e-4


def test_arrow_input_errors_are_clear(embedder):
    with pytest.raises(mmembed.InvalidInputError, match="`uri`, `path` or `url`"):
        embedder.embed_arrow(pa.table({"name": ["a.png"]}))
    with pytest.raises(mmembed.InvalidInputError, match="`status`"):
        embedder.embed_arrow(pa.table({"uri": ["a.png"], "status": ["x"]}))
    empty = embedder.embed_arrow(pa.table({"uri": pa.array([], pa.string())}))
    assert empty.num_rows == 0 and "embedding" in empty.column_names


def test_errors_are_python_exceptions_with_the_library_messages():
    with pytest.raises(mmembed.MmembedError, match="cannot load model `no-such-model`"):
        mmembed.Embedder("local:no-such-model")
    with pytest.raises(mmembed.InvalidInputError, match="backend spec"):
        mmembed.Embedder("nonsense:thing")
    e = mmembed.Embedder("local:demo")
    with pytest.raises(mmembed.InvalidInputError, match="got int"):
        e.embed_images([5])
    with pytest.raises(mmembed.InvalidInputError, match="interval"):
        e.embed_videos([b"x"], interval_sec=1)
    # A size the model cannot make refuses the call, not each row.
    for call in (
        lambda: e.embed_texts(["a star"], dimension=32),
        lambda: e.embed_images([b"x"], dimension=32),
        lambda: e.embed_arrow(pa.table({"uri": ["a.png"]}), dimension=32),
    ):
        with pytest.raises(mmembed.InvalidInputError, match=r"unsupported dimension 32: .*\[64\]"):
            call()
    assert e.embed_texts(["a star"], dimension=64).ok.tolist() == [True]


def test_the_gil_is_released_while_the_model_runs(embedder, media):
    """Another Python thread keeps running during one long embed call."""
    images = [(media / "large-blue-square-bottom.png").read_bytes()] * 400
    ticks = 0
    stop = threading.Event()

    def count():
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            time.sleep(0.001)

    t = threading.Thread(target=count)
    t.start()
    time.sleep(0.05)
    before = ticks
    start = time.perf_counter()
    r = embedder.embed_images(images)
    took = time.perf_counter() - start
    during = ticks - before
    stop.set()
    t.join()
    assert all(r.ok)
    assert took > 0.1, f"the call was too short ({took:.3f} s) to tell"
    # With the GIL held the counter could not move at all during the call.
    assert during > 0.2 * took / 0.0015, (during, took)


def test_pickles_as_its_spec(embedder):
    import pickle

    copy = pickle.loads(pickle.dumps(embedder))
    assert copy.spec == embedder.spec and copy.info == embedder.info
    a = embedder.embed_texts(["a green ring"]).embeddings
    np.testing.assert_array_equal(copy.embed_texts(["a green ring"]).embeddings, a)


def test_a_forked_child_gets_a_clear_error_not_a_hang(embedder):
    import multiprocessing as mp

    def child(q):
        try:
            embedder.embed_texts(["a star"])
            q.put("no error")
        except mmembed.MmembedError as e:
            q.put(str(e))

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=child, args=(q,))
    p.start()
    msg = q.get(timeout=30)
    p.join(timeout=30)
    assert "a fork" in msg and "spawn" in msg, msg


def test_allocator_is_set_for_inference(embedder):
    # Building an embedder set glibc's allocator once (as the CLI does);
    # calling it again is harmless and says whether it takes effect here.
    import platform

    assert mmembed._malloc_tuned
    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert mmembed.tune_malloc_for_inference() is expected
