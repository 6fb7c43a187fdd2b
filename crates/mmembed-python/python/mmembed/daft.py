"""Daft adapter: a class UDF that loads the model once per worker.

Daft's functions return one value per input row, and a video has one row
per segment, so :class:`DaftEmbedder` returns, for each object, the list of
its rows; :func:`embed_media` explodes and unnests them into the flat rows
of ``mmembed batch``::

    import daft
    from mmembed.daft import embed_media

    df = daft.from_glob_path("s3://bucket/photos/*.jpg")          # path, size, ...
    df = df.with_column("bytes", df["path"].download())
    rows = embed_media(df, spec="local:demo")                     # uri, embedding, status, ...
    rows.write_parquet("s3://bucket/embeddings/")
"""

from __future__ import annotations

import daft
import numpy as np
import pyarrow as pa

from . import Embedder

#: The struct of one row (the columns of ``mmembed batch`` but the input's).
ROW_FIELDS = {
    "uri": daft.DataType.string(),
    "content_type": daft.DataType.string(),
    "size_bytes": daft.DataType.int64(),
    "embedding": daft.DataType.list(daft.DataType.float32()),
    "status": daft.DataType.string(),
    "video_start_sec": daft.DataType.float64(),
    "video_end_sec": daft.DataType.float64(),
    "model": daft.DataType.string(),
    "space": daft.DataType.string(),
    "dimension": daft.DataType.int32(),
}
ROWS_DTYPE = daft.DataType.list(daft.DataType.struct(ROW_FIELDS))
_ARROW_FIELDS = [
    pa.field("uri", pa.string()),
    pa.field("content_type", pa.string()),
    pa.field("size_bytes", pa.int64()),
    pa.field("embedding", pa.list_(pa.float32())),
    pa.field("status", pa.string()),
    pa.field("video_start_sec", pa.float64()),
    pa.field("video_end_sec", pa.float64()),
    pa.field("model", pa.string()),
    pa.field("space", pa.string()),
    pa.field("dimension", pa.int32()),
]


@daft.cls
class DaftEmbedder:
    """``DaftEmbedder(spec)(uri_column, bytes_column=None)``: per object, its rows."""

    def __init__(
        self,
        spec: str = "local:demo",
        start_sec: int | None = None,
        end_sec: int | None = None,
        interval_sec: int | None = None,
        dimension: int | None = None,
    ) -> None:
        self.embedder = Embedder(spec)
        self.options = dict(
            start_sec=start_sec, end_sec=end_sec, interval_sec=interval_sec, dimension=dimension
        )

    @daft.method.batch(return_dtype=ROWS_DTYPE)
    def __call__(self, uri: daft.Series, data: daft.Series | None = None) -> pa.Array:
        cols = {"uri": uri.to_arrow().cast(pa.string())}
        if data is not None:
            cols["bytes"] = data.to_arrow().cast(pa.large_binary())
        batch = pa.RecordBatch.from_pydict(cols)
        rows, index = self.embedder.embed_record_batch(batch, **self.options)
        rows = pa.StructArray.from_arrays(
            [rows.column(f.name).cast(f.type) for f in _ARROW_FIELDS], fields=_ARROW_FIELDS
        )
        # Rows come in input order, at least one per input: list offsets.
        offsets = np.searchsorted(index, np.arange(len(batch) + 1)).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), rows)


def embed_media(
    df: daft.DataFrame,
    *,
    spec: str = "local:demo",
    uri: str = "path",
    data: str | None = "bytes",
    **options,
) -> daft.DataFrame:
    """The flat rows of ``mmembed batch`` for a DataFrame naming media in
    column ``uri`` (with their content in ``data``, else read from the
    names); the other columns are kept on each row of their object."""
    embed = DaftEmbedder(spec, **options)
    args = [df[uri]] + ([df[data]] if data is not None else [])
    keep = [c for c in df.column_names if c not in (uri, data) and c not in ROW_FIELDS]
    out = df.select(*[df[c] for c in keep], embed(*args).alias("_mmembed_rows"))
    out = out.explode("_mmembed_rows")
    return out.select(
        *[daft.col(c) for c in keep],
        *[daft.col("_mmembed_rows").get(f).alias(f) for f in ROW_FIELDS],
    )
