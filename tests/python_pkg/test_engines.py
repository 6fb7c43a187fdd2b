"""Ray Data and Daft pipelines over the fixture media (broken files among
them) give the rows of `mmembed batch` for the same files."""

from __future__ import annotations

import pyarrow as pa
import pytest

from conftest import INTERVAL, assert_same_rows, rows_by_key


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("calls_per_actor", [1, 2])
def test_ray_data_rows_equal_the_cli_rows(ray_local, media, cli_rows, calls_per_actor):
    """One batch at a time per actor, and two at once on threads (the
    docstring's GPU advice: the model runs one while the next decodes)."""
    from mmembed.ray import RayEmbedder

    ds = ray_local.data.read_binary_files(str(media), include_paths=True)
    rows = ds.map_batches(
        RayEmbedder,
        fn_constructor_kwargs={"spec": "local:demo", "interval_sec": INTERVAL},
        batch_format="pyarrow",
        batch_size=4,
        compute=ray_local.data.ActorPoolStrategy(
            size=1,
            max_concurrent_calls_per_actor=calls_per_actor,
            enable_true_multi_threading=calls_per_actor > 1,
        ),
    )
    table = pa.Table.from_batches(
        [b for b in rows.iter_batches(batch_format="pyarrow", batch_size=None) for b in b.to_batches()]
    )
    assert_same_rows(rows_by_key(table), cli_rows)


def test_daft_rows_equal_the_cli_rows(media, cli_rows):
    daft = pytest.importorskip("daft")
    from mmembed.daft import embed_media

    df = daft.from_pydict({"path": sorted(str(p) for p in media.iterdir())})
    df = df.with_column("bytes", df["path"].download())
    out = embed_media(df, spec="local:demo", interval_sec=INTERVAL).to_arrow()
    assert_same_rows(rows_by_key(out), cli_rows)


def test_daft_reads_the_files_itself_without_a_bytes_column(media, cli_rows):
    daft = pytest.importorskip("daft")
    from mmembed.daft import embed_media

    files = sorted(str(p) for p in media.iterdir())
    df = daft.from_pydict({"file": files, "label": [f"x{i}" for i in range(len(files))]})
    out = embed_media(df, spec="local:demo", uri="file", data=None, interval_sec=INTERVAL)
    table = out.to_arrow()
    assert table.column_names[0] == "label"
    assert_same_rows(rows_by_key(table), cli_rows)
